import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def outputs():
    @task(multiple_outputs=True)
    def pair():
        return {"a": 1, "b": 2}

    @task
    def use(v):
        print(v)

    p = pair()
    use(p["a"])


outputs()
