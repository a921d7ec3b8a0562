"""Run the real DAG `answersheet_<road>` for one day with `airflow dags test`, in local mode (no cluster).

A throw-away AIRFLOW_HOME (SQLite), the repository's dags/ folder, and ANSWERSHEET_EXECUTION_MODE=local:
every task runs the same `answersheet <stage> ...` command line a pod would, as a subprocess.
Used by `make demo` and the DAG end-to-end test.
"""

from __future__ import annotations

import collections
import datetime as dt
import re
import subprocess
import sys
import time
import zoneinfo
from pathlib import Path

from answersheet.config import load_road
from answersheet.errors import AnswersheetError

REPO_DAGS = Path(__file__).resolve().parents[2] / "dags"
TAIL_LINES = 40
ERROR_MARK = "answersheet: error:"
TASK_LOG_SUFFIX = re.compile(r"\s+\[[\w.]+\]\s+loc=\S+$")  # `[logger.name] loc=file.py:12` of task log lines


def airflow_env(airflow_home: Path, roads_file: Path, env: dict[str, str], dags_folder: Path) -> dict[str, str]:
    """env plus what points Airflow at a private SQLite home, our dags/ and the roads file, in local mode."""
    return {
        **{k: v for k, v in env.items() if k != "AIRFLOW_CONFIG"},  # no airflow.cfg but the home's own
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "ANSWERSHEET_ROADS_FILE": str(roads_file),
        "ANSWERSHEET_EXECUTION_MODE": "local",
    }


def run_airflow(args: list[str], env: dict[str, str], log_path: Path, echo: bool = False) -> tuple[int, list[str]]:
    """Run `airflow <args>`; output to log_path (and stderr if echo); return the exit code and the last lines
    (the stages' `answersheet: error:` lines first)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ airflow {' '.join(args)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
            if ERROR_MARK in line:
                error = TASK_LOG_SUFFIX.sub("", line[line.index(ERROR_MARK):].strip())
                if error not in errors:
                    errors.append(error)
        code = proc.wait()
    return code, [*errors, *(["..."] if errors else []), *tail]


def logical_datetime(road: str, day: str, roads_file: Path) -> str:
    """Noon of `day` in the road's schedule time zone (ISO 8601): the DAG's date template gives back `day`."""
    try:
        date = dt.date.fromisoformat(day)
    except ValueError:
        raise AnswersheetError(f"logical date {day!r}: expected YYYY-MM-DD") from None
    tz = load_road(roads_file, road).schedule.get("timezone", "Asia/Seoul")
    return dt.datetime(date.year, date.month, date.day, 12, tzinfo=zoneinfo.ZoneInfo(tz)).isoformat()


def prepare_airflow_home(airflow_home: Path, roads_file: Path, env: dict, dags_folder: Path | None = None
                         ) -> dict[str, str]:
    """Create (once) a migrated SQLite AIRFLOW_HOME; return the environment for `airflow` commands on it."""
    dags_folder = Path(dags_folder or REPO_DAGS).resolve()
    if not (dags_folder / "answersheet_dags.py").is_file():
        raise AnswersheetError(f"{dags_folder}: no answersheet_dags.py (run from a source checkout)")
    airflow_home = Path(airflow_home).resolve()
    airflow_home.mkdir(parents=True, exist_ok=True)
    full_env = airflow_env(airflow_home, Path(roads_file).resolve(), {k: str(v) for k, v in env.items()},
                           dags_folder)
    migrated = airflow_home / ".db-migrated"
    if not migrated.is_file():
        log_path = airflow_home / "db-migrate.log"
        code, tail = run_airflow(["db", "migrate"], full_env, log_path)
        if code:
            raise AnswersheetError(f"airflow db migrate failed (exit {code}, log {log_path}):\n" + "\n".join(tail))
        migrated.touch()
    return full_env


def run_dag_test(road: str, logical_date: str, roads_file: Path, airflow_home: Path, env: dict,
                 *, dags_folder: Path | None = None, echo: bool = True) -> None:
    """`airflow dags test answersheet_<road> <date>` in local mode; AnswersheetError with the log's tail on failure."""
    when = logical_datetime(road, logical_date, Path(roads_file))
    full_env = prepare_airflow_home(airflow_home, roads_file, env, dags_folder)
    log_path = Path(full_env["AIRFLOW_HOME"]) / f"dags-test-{road}-{logical_date}.log"
    t0 = time.monotonic()
    code, tail = run_airflow(["dags", "test", f"answersheet_{road}", when], full_env, log_path, echo)
    if code:
        raise AnswersheetError(f"DAG answersheet_{road} failed for {logical_date} (exit {code}, log {log_path}, "
                               f"{time.monotonic() - t0:.0f}s):\n" + "\n".join(tail))
