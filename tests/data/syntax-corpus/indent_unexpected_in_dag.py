from airflow import DAG
with DAG('d') as dag:
    a = 1
        b = 2
