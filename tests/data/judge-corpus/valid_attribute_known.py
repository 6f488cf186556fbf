import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator
with DAG("attrok", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    a = BashOperator(task_id="a", bash_command="ls")
    b = BashOperator(task_id="b", bash_command="ls")
    a.set_downstream(b)
    print(dag.dag_id, dag.tasks, a.task_id)
