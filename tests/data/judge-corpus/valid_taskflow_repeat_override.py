import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def repeats():
    @task
    def step(x):
        return x

    a = step(1)
    b = step(a)
    step.override(task_id="final")(b)


repeats()
