import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.operators.python import ShortCircuitOperator
with DAG("short_circuit", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    ShortCircuitOperator(task_id="check", python_callable=lambda: True) >> EmptyOperator(task_id="after")
