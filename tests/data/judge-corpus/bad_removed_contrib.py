import pendulum
from airflow import DAG
from airflow.contrib.operators.magic_operator import MagicOperator
with DAG("contrib", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    MagicOperator(task_id="m")
