import pendulum
from airflow.decorators import dag, task


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def dup_override():
    @task
    def s():
        return 1

    s.override(task_id="x")()
    s.override(task_id="x")()


dup_override()
