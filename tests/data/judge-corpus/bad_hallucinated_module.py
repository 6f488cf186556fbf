import pendulum
from airflow import DAG
from airflow.operators.spark_magic import SparkMagicOperator
with DAG("hallucinated", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    SparkMagicOperator(task_id="s")
