import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.utils.trigger_rule import TriggerRule
with DAG("trigger_rule", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    a = EmptyOperator(task_id="a")
    done = EmptyOperator(task_id="done", trigger_rule=TriggerRule.ALL_DONE)
    a >> done
