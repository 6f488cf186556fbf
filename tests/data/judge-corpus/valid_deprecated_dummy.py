import pendulum
from airflow import DAG
from airflow.operators.dummy import DummyOperator
with DAG("deprecated_dummy", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    DummyOperator(task_id="d")
