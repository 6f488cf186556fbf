import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator
from airflow.providers.kubernetes.operators.pod import KubernetesPodOperator
with DAG("k8s", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None, catchup=False) as dag:
    KubernetesPodOperator(task_id="p", name="p", image="busybox")
