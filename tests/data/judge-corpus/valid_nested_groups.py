import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.utils.task_group import TaskGroup
with DAG("nested_groups", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    with TaskGroup("outer"):
        with TaskGroup("inner"):
            EmptyOperator(task_id="t")
        EmptyOperator(task_id="t")
