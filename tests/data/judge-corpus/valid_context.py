import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
with DAG("context", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    a = EmptyOperator(task_id="a")
    b = EmptyOperator(task_id="b")
    c = EmptyOperator(task_id="c")
    a >> [b, c]
