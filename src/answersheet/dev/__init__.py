"""Developer tooling (local S3 server, demo, local Airflow): not needed by the stage images."""
