import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.utils.task_group import TaskGroup

with DAG("tg_attr", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    with TaskGroup("g") as g:
        BashOperator(task_id="a", bash_command="ls")
    g.add_dependency(BashOperator(task_id="b", bash_command="ls"))
