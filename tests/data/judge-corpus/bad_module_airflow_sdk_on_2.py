import pendulum
from airflow.sdk import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False)
def sdk_flow():
    @task
    def a():
        return 1

    a()


sdk_flow()
