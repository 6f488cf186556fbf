from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.utils.dates import days_ago
with DAG("days_ago", start_date=days_ago(1), schedule=None) as dag:
    EmptyOperator(task_id="e")
