import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
from airflow.sensors.time_delta import TimeDeltaSensor
import datetime
with DAG("sensor", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    TimeDeltaSensor(task_id="wait", delta=datetime.timedelta(minutes=1)) >> EmptyOperator(task_id="go")
