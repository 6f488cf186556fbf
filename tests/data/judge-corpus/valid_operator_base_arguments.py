import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator

import datetime
with DAG("base", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    BashOperator(task_id="a", bash_command="ls", retries=2, retry_delay=datetime.timedelta(minutes=1), owner="x", pool="default_pool", doc_md="d", trigger_rule="all_done", env={"A": "1"}, cwd="/tmp")
