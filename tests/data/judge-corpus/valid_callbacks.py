import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator


def alert(context):
    print(context)


with DAG("callbacks", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False, default_args={"on_failure_callback": alert, "retries": 1}) as dag:
    EmptyOperator(task_id="a")
