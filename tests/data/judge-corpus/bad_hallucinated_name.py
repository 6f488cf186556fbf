import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperater
with DAG("typo", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    BashOperater(task_id="b", bash_command="ls")
