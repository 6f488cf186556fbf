import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def mapping():
    @task
    def numbers():
        return [1, 2, 3]

    @task
    def add_one(x):
        return x + 1

    add_one.expand(x=numbers())


mapping()
