from airflow import DAG
from airflow.operators.empty import EmptyOperator
with DAG("missing_datetime", start_date=datetime(2024, 1, 1), schedule=None) as dag:
    EmptyOperator(task_id="a")
