import pendulum
from airflow.decorators import dag, task
from airflow.operators.empty import EmptyOperator


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def task_branch():
    @task.branch
    def pick():
        return "a"

    pick() >> [EmptyOperator(task_id="a"), EmptyOperator(task_id="b")]


task_branch()
