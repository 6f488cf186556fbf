import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.models.param import Param
with DAG("params", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False, params={"n": Param(3, type="integer")}) as dag:
    BashOperator(task_id="show", bash_command="echo {{ params.n }}")
