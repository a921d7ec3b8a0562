"""Airflow on this machine, in local mode (no cluster): `airflow dags test` of one day, and backfills.

A private AIRFLOW_HOME (SQLite), the repository's dags/ folder, and ANSWERSHEET_EXECUTION_MODE=local:
every task runs the same `answersheet <stage> ...` command line a pod would, as a subprocess.
Used by `make demo`, `make backfill` (the bounds; LOCAL=1 runs it here) and the DAG end-to-end tests.

    python -m answersheet.local_airflow backfill-args --road R --from 2026-11-02 --to 2026-11-06
    python -m answersheet.local_airflow backfill --home .airflow --road R --from … --to … [--dry-run]
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zoneinfo
from pathlib import Path

from answersheet.config import load_road, read_roads_file
from answersheet.errors import AnswersheetError

REPO_DAGS = Path(__file__).resolve().parents[2] / "dags"
ROADS_FILE = REPO_DAGS / "roads.yaml"
REPROCESS = ("none", "failed", "completed")
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


def run_airflow(args: list[str], env: dict[str, str], log_path: Path, echo: bool = False,
                timeout: float | None = None) -> tuple[int, list[str]]:
    """Run `airflow <args>`; output to log_path (and stderr if echo); return the exit code and the last lines
    (the stages' `answersheet: error:` lines first). After `timeout` seconds the command's whole process
    group is killed (SIGKILL: `airflow dags test` ignores SIGTERM while it waits out a retry delay)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ airflow {' '.join(args)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL)) if timeout else None
        if timer:
            timer.start()
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
        if timer:
            timer.cancel()
            if code == -signal.SIGKILL:
                tail.append(f"airflow {' '.join(args[:2])}: killed after {timeout:.0f}s")
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


def _day(name: str, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise AnswersheetError(f"{name}={value}: expected a date YYYY-MM-DD") from None


def backfill_bounds(roads_file: Path, road: str, first: str, last: str) -> tuple[str, str]:
    """`--from-date`/`--to-date` that make `airflow backfill create` process the days first..last (inclusive).

    Airflow creates a run for every logical date in [from, to], and a bare date means 00:00 in Airflow's
    default time zone (UTC). A run's logical date is the day it processes at the cron time in the road's
    zone (factory.timetable_for, either process_date), so the bounds are 00:00:00 of `first` and 23:59:59
    of `last` in the road's zone, with that day's UTC offset (DST-safe). For Asia/Seoul at 09:00, bare
    dates happen to select the same days (09:00 KST = 00:00 UTC); for Los Angeles they would not.
    """
    roads = read_roads_file(roads_file)
    ids = [r.get("id") for r in roads]
    if road not in ids:
        raise AnswersheetError(f"ROAD={road}: not a road of {roads_file} (roads: {', '.join(map(str, ids))})")
    tz = (next(r for r in roads if r.get("id") == road).get("schedule") or {}).get("timezone", "Asia/Seoul")
    start, end = _day("FROM", first), _day("TO", last)
    if start > end:
        raise AnswersheetError(f"FROM={first} is after TO={last}")
    zone = zoneinfo.ZoneInfo(tz)
    return (dt.datetime.combine(start, dt.time(0, 0, 0), zone).isoformat(),
            dt.datetime.combine(end, dt.time(23, 59, 59), zone).isoformat())


def backfill_args(roads_file: Path, road: str, first: str, last: str, *, reprocess: str | None = None,
                  dry_run: bool = False) -> list[str]:
    """The arguments of `airflow backfill create` for the days first..last of the road."""
    start, end = backfill_bounds(roads_file, road, first, last)
    if reprocess and reprocess not in REPROCESS:
        raise AnswersheetError(f"REPROCESS={reprocess}: expected one of {', '.join(REPROCESS)}")
    return ["backfill", "create", "--dag-id", f"answersheet_{road}", "--from-date", start, "--to-date", end,
            *(["--reprocess-behavior", reprocess] if reprocess else []), *(["--dry-run"] if dry_run else [])]


def run_backfill(airflow_home: Path, roads_file: Path, road: str, first: str, last: str, env: dict, *,
                 reprocess: str | None = None, dry_run: bool = False, echo: bool = True) -> tuple[int, list[str]]:
    """`airflow backfill create` for days first..last against a local AIRFLOW_HOME (migrated and the DAGs
    serialized into it first); returns the exit code and the output's tail."""
    args = backfill_args(roads_file, road, first, last, reprocess=reprocess, dry_run=dry_run)
    full_env = prepare_airflow_home(airflow_home, roads_file, env)
    log_path = Path(full_env["AIRFLOW_HOME"]) / "backfill.log"
    code, tail = run_airflow(["dags", "reserialize"], full_env, log_path)
    if code:
        raise AnswersheetError(f"airflow dags reserialize failed (exit {code}, log {log_path}):\n" + "\n".join(tail))
    return run_airflow(args, full_env, log_path, echo=echo)


def main(argv: list[str] | None = None) -> int:
    """`backfill-args` prints the `airflow backfill create` arguments (one shell word per argument, for the
    Makefile's kubectl exec); `backfill` runs it against a local Airflow home."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python -m answersheet.local_airflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("backfill-args", "backfill"):
        p = sub.add_parser(name)
        p.add_argument("--roads-file", type=Path, default=ROADS_FILE)
        p.add_argument("--road", required=True)
        p.add_argument("--from", dest="first", required=True, help="first day to process, YYYY-MM-DD")
        p.add_argument("--to", dest="last", required=True, help="last day to process, YYYY-MM-DD (inclusive)")
        p.add_argument("--reprocess", default=None, help="none | failed | completed")
        p.add_argument("--dry-run", action="store_true", help="airflow's --dry-run: list the runs, create nothing")
        if name == "backfill":
            p.add_argument("--home", type=Path, required=True, help="the local AIRFLOW_HOME (created if missing)")
    args = parser.parse_args(argv)
    try:
        if args.command == "backfill-args":
            print(shlex.join(backfill_args(args.roads_file, args.road, args.first, args.last,
                                           reprocess=args.reprocess, dry_run=args.dry_run)))
            return 0
        code, _ = run_backfill(args.home, args.roads_file, args.road, args.first, args.last, dict(os.environ),
                               reprocess=args.reprocess, dry_run=args.dry_run)
        return code
    except AnswersheetError as exc:
        print(f"answersheet: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
