"""Airflow DAGs `answersheet_<road>`, one per road in the roads file ($ANSWERSHEET_ROADS_FILE, else roads.yaml here).

Thin on purpose: answersheet_dagkit/ (next to this file, skipped by .airflowignore) builds the DAGs.
A road with a bad key is reported as an import error of this file naming the road and key; the other
roads' DAGs still load.
"""

import sys
from pathlib import Path

# Imported here so that Airflow's DAG processor pre-imports it once, before forking each parse
# ([dag_processor] parsing_pre_import_modules): the kubernetes client costs ~0.9 s to import.
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # the DAGs folder is on sys.path, but not when this repo is a git-sync subdir
    sys.path.append(str(_HERE))

from answersheet_dagkit.factory import build_dags  # noqa: E402

globals().update(build_dags(_HERE))
