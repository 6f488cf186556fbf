import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator


def make_tasks():
    return [BashOperator(task_id=f"t{i}", bash_command=CMD) for i in range(2)]


with DAG("helper", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    make_tasks()
