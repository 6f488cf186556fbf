import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from tests_common.test_utils.watcher import watcher
with DAG("watched", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    EmptyOperator(task_id="a") >> watcher()
