import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator


def work():
    try:
        return 1
    except Exception, e:
        return 0


with DAG("py2except", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    PythonOperator(task_id="w", python_callable=work)
