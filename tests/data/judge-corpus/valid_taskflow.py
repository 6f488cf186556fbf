import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False)
def taskflow_etl():
    @task
    def extract():
        return {"a": 1}

    @task
    def transform(d: dict):
        return {k: v * 2 for k, v in d.items()}

    @task
    def load(d: dict):
        print(d)

    load(transform(extract()))


taskflow_etl()
