import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
DAG_ID = "constant_dag_id"
with DAG(dag_id=DAG_ID, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    EmptyOperator(task_id="only")
