import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator


def work():
    return 1


with DAG("pyargs", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    PythonOperator(task_id="w", python_callable=work, provide_context=True)
