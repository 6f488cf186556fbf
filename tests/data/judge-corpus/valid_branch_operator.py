import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.operators.python import BranchPythonOperator


def choose():
    return "left"


with DAG("branching", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    branch = BranchPythonOperator(task_id="branch", python_callable=choose)
    branch >> [EmptyOperator(task_id="left"), EmptyOperator(task_id="right")]
