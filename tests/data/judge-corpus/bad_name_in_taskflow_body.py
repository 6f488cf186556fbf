import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False)
def flow():
    @task
    def extract():
        return 1

    extract.override(task_id=TASK_NAME)()


flow()
