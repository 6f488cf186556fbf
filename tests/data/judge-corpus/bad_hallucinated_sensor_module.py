import pendulum
from airflow import DAG
from airflow.sensors.s3_magic_sensor import S3MagicSensor
with DAG("hallucinated_sensor", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None) as dag:
    S3MagicSensor(task_id="s")
