import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from tests.system.utils import get_test_run
with DAG("system_test", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    EmptyOperator(task_id="a")
test_run = get_test_run(dag)
