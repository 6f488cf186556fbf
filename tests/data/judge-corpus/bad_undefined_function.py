import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
with DAG("undef_fn", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False, default_args={"on_failure_callback": notify_team}) as dag:
    EmptyOperator(task_id="a")
