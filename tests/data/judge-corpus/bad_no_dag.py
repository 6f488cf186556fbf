from airflow.operators.empty import EmptyOperator

VALUE = 1
