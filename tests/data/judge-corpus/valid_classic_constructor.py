import pendulum
from airflow import DAG
from airflow.operators.empty import EmptyOperator
from airflow.operators.bash import BashOperator
dag = DAG("classic_constructor", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False)
a = EmptyOperator(task_id="a", dag=dag)
b = BashOperator(task_id="b", bash_command="echo hi", dag=dag)
a >> b
