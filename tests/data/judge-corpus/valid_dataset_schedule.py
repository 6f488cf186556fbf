import pendulum
from airflow import DAG, Dataset
from airflow.operators.empty import EmptyOperator
DATA = Dataset("s3://bucket/data.csv")
with DAG("producer", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as p:
    EmptyOperator(task_id="produce", outlets=[DATA])
with DAG("consumer", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=[DATA]) as c:
    EmptyOperator(task_id="consume")
