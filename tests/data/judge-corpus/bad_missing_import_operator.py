import pendulum
from airflow import DAG
with DAG("missing_op", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    PythonOperator(task_id="p", python_callable=print)
