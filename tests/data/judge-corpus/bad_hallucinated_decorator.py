import pendulum
from airflow.decorators import dag, taskflow


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def f():
    pass


f()
