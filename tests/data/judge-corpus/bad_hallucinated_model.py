import pendulum
from airflow.models import DAG, DagRunner
from airflow.operators.empty import EmptyOperator
with DAG("model", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    EmptyOperator(task_id="a")
