import pendulum
from airflow.decorators import dag, task, task_group


@dag(start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), schedule=None)
def grouped():
    @task
    def one():
        return 1

    @task_group
    def stage(v):
        @task
        def double(x):
            return 2 * x

        return double(v)

    stage(one())


grouped()
