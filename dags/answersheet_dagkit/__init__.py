"""Builds the answersheet DAGs from the roads file (imported by ../answersheet_dags.py; not a DAG file).

Imports only Airflow, its providers, the stdlib, pendulum and yaml, so `dags/` works git-synced into
the official Airflow image: no torch, boto3 or `answersheet` at parse time.
"""
