import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.utils.edgemodifier import Label
with DAG("labels", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    a = EmptyOperator(task_id="a")
    b = EmptyOperator(task_id="b")
    a >> Label("then") >> b
