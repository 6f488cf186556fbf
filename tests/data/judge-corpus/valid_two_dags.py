import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
with DAG("first", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as d1:
    EmptyOperator(task_id="a")
with DAG("second", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as d2:
    EmptyOperator(task_id="a")
