import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def forgotten():
    @task
    def t():
        return 1

    t()
