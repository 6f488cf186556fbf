import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.utils.task_group import TaskGroup
with DAG("groups", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    start = EmptyOperator(task_id="start")
    with TaskGroup("section") as section:
        x = EmptyOperator(task_id="x")
        y = EmptyOperator(task_id="y")
        x >> y
    end = EmptyOperator(task_id="end")
    start >> section >> end
