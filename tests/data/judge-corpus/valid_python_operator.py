import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator


def greet(name):
    print(name)


with DAG("python_op", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    PythonOperator(task_id="greet", python_callable=greet, op_kwargs={"name": "x"})
