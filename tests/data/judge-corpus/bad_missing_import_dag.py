import pendulum
from airflow.operators.empty import EmptyOperator
with DAG("missing_dag", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    EmptyOperator(task_id="a")
