import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.models.baseoperator import chain
with DAG("chained", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    ts = [EmptyOperator(task_id=f"t{i}") for i in range(4)]
    chain(*ts)
