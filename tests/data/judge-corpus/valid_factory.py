import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator


def make(name):
    with DAG(f"factory_{name}", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
        EmptyOperator(task_id="t")
    return dag


for n in ["a", "b"]:
    globals()[f"dag_{n}"] = make(n)
