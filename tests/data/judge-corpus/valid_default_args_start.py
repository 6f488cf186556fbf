from datetime import datetime
from airflow import DAG
from airflow.operators.bash import BashOperator
default_args = {"owner": "data", "start_date": datetime(2024, 1, 1)}
with DAG("default_args", default_args=default_args, schedule="@daily", catchup=False) as dag:
    BashOperator(task_id="run", bash_command="date")
