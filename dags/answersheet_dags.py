"""Airflow DAGs `answersheet_<road>`, one per road in the roads file ($ANSWERSHEET_ROADS_FILE, else roads.yaml here),
and `answersheet_training_example`, an example consumer of the roads' answer-sheet Assets (paused when created).

Thin on purpose: answersheet_dagkit/ (next to this file, skipped by .airflowignore) builds the DAGs.
A road with a bad key is reported as an import error of this file naming the road and key; the other
roads' DAGs still load.
"""

import sys
from pathlib import Path

# Imported here so that Airflow's DAG processor pre-imports them once, before forking each parse
# ([dag_processor] parsing_pre_import_modules): the kubernetes client costs ~0.9 s to import, and the
# amazon provider's s3:// asset URI handler (the roads' answer-sheet Assets; it imports boto3) ~0.5 s.
import airflow.providers.amazon.aws.assets.s3  # noqa: F401
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the DAGs folder is on sys.path, but not when this repo is a git-sync subdir
    sys.path.append(str(_HERE))

from answersheet_dagkit.factory import build_dags  # noqa: E402

globals().update(build_dags(_HERE))
