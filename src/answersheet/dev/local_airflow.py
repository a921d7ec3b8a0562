"""Airflow on this machine, in local mode (no cluster): `airflow dags test` of one day, and backfills.

A private AIRFLOW_HOME (SQLite), the repository's dags/ folder, and ANSWERSHEET_EXECUTION_MODE=local:
every task runs the same `answersheet <stage> ...` command line a pod would, as a subprocess.
Used by `make demo`, `make backfill` (the bounds; LOCAL=1 runs it here) and the DAG end-to-end tests.

    python -m answersheet.dev.local_airflow backfill-args --road R --from 2026-11-02 --to 2026-11-06
    python -m answersheet.dev.local_airflow backfill --home .airflow --road R --from … --to … [--dry-run]
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
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

REPO_DAGS = Path(__file__).resolve().parents[3] / "dags"
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


def _raw_road(roads_file: Path, road: str) -> dict:
    """The road's mapping (defaults merged) from the roads file; AnswersheetError naming the known roads."""
    roads = read_roads_file(roads_file)
    for raw in roads:
        if raw.get("id") == road:
            return raw
    ids = [r.get("id") for r in roads]
    raise AnswersheetError(f"ROAD={road}: not a road of {roads_file} (roads: {', '.join(map(str, ids))})")


def backfill_bounds(roads_file: Path, road: str, first: str, last: str) -> tuple[str, str]:
    """`--from-date`/`--to-date` that make `airflow backfill create` process the days first..last (inclusive).

    Airflow creates a run for every logical date in [from, to], and a bare date means 00:00 in Airflow's
    default time zone (UTC). A run's logical date is the day it processes at the cron time in the road's
    zone (factory.timetable_for, either process_date), so the bounds are 00:00:00 of `first` and 23:59:59
    of `last` in the road's zone, with that day's UTC offset (DST-safe). For Asia/Seoul at 09:00, bare
    dates happen to select the same days (09:00 KST = 00:00 UTC); for Los Angeles they would not.
    """
    tz = (_raw_road(roads_file, road).get("schedule") or {}).get("timezone", "Asia/Seoul")
    start, end = _day("FROM", first), _day("TO", last)
    if start > end:
        raise AnswersheetError(f"FROM={first} is after TO={last}")
    zone = zoneinfo.ZoneInfo(tz)
    return (dt.datetime.combine(start, dt.time(0, 0, 0), zone).isoformat(),
            dt.datetime.combine(end, dt.time(23, 59, 59), zone).isoformat())


def backfill_args(roads_file: Path, road: str, first: str, last: str, *, reprocess: str | None = None,
                  dry_run: bool = False, max_active_runs: int | None = None) -> list[str]:
    """The arguments of `airflow backfill create` for the days first..last of the road.

    `--max-active-runs` is the road's `schedule.max_active_runs` unless given: a backfill otherwise runs 10
    days at once (Airflow's default for backfills, which ignores the DAG's max_active_runs), 10 GPU pods.
    """
    start, end = backfill_bounds(roads_file, road, first, last)
    if reprocess and reprocess not in REPROCESS:
        raise AnswersheetError(f"REPROCESS={reprocess}: expected one of {', '.join(REPROCESS)}")
    max_active = max_active_runs or (_raw_road(roads_file, road).get("schedule") or {}).get("max_active_runs", 1)
    return ["backfill", "create", "--dag-id", f"answersheet_{road}", "--from-date", start, "--to-date", end,
            "--max-active-runs", str(max_active),
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


# --- `make up` / `make down`: a local Airflow with a backfilled week ------------------------------------------
UP_STATE = "up.json"  # what `up` started: PIDs (each the leader of its own process group), URL, road, days
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
DEFAULT_PORT = 8080
SAMPLE_SETS = 4  # sets (6 images each) per sample day: a green week in minutes on a laptop CPU
STOP_GRACE_S = 20.0


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start argv detached, in a new session (its PID is its process group id), output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=log_path.parent)
    return proc.pid


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22); None if it is gone or a
    zombie. With the PID it identifies the process: a recycled PID has another start time. (The command
    line does not: the api-server rewrites its own, "airflow api_server -- host:…".)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else int(fields[19])


def _ours(pid: int, started: int) -> bool:
    """Is `pid` still the process `up` started, not a recycled PID?"""
    return _started(pid) == started


def _read_state(home: Path) -> dict:
    path = home / UP_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_state(home: Path, state: dict) -> None:
    (home / UP_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def _read_env_file(path: Path) -> dict[str, str]:
    """`export K=V` lines (answersheet.dev.s3server --env-file) -> {K: V}."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    return env


def _wait(what: str, ready, timeout: float, pid: int | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if pid is not None and not _started(pid):
            raise AnswersheetError(f"{what}: the process exited (log {log})")
        time.sleep(0.5)
    raise AnswersheetError(f"{what}: not ready after {timeout:.0f}s (log {log})")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own 127.0.0.1 URL
            return resp.status == 200
    except OSError:
        return False


def dry_run_days(env: dict[str, str], log_path: Path, roads_file: Path, road: str, first: dt.date, last: dt.date,
                 timezone: str) -> list[str]:
    """The days Airflow can backfill in first..last, done or not (its own timetable and "interval has
    ended" rule; --reprocess-behavior completed so that days that already have a run are listed too)."""
    code, tail = run_airflow(backfill_args(roads_file, road, first.isoformat(), last.isoformat(), dry_run=True,
                                           reprocess="completed"), env, log_path)
    output = log_path.read_text(encoding="utf-8").rsplit("$ airflow backfill", 1)[-1]
    if code:
        raise AnswersheetError(f"airflow backfill create --dry-run failed (exit {code}, log {log_path}):\n"
                               + "\n".join(tail))
    stamps = re.findall(r"\|\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00)\s*\|", output)
    zone = zoneinfo.ZoneInfo(timezone)
    return [dt.datetime.fromisoformat(s).astimezone(zone).date().isoformat() for s in stamps]


def up(home: Path, *, port: int = DEFAULT_PORT, roads_src: Path = ROADS_FILE, road: str | None = None,
       days: int = 5, sets: int = SAMPLE_SETS, say=print) -> dict:
    """Start a local Airflow (api-server on 127.0.0.1:port, scheduler, dag-processor, triggerer; DAGs in local
    mode) and a local S3 server (SeaweedFS), put the last `days` processable days of sample archives into
    S3 and backfill them, so the Grid fills with a week of runs. Everything started is recorded in
    <home>/up.json for `down`. Returns that state."""
    from answersheet.dev.demo import WEIGHTS_KEY, demo_weights, effective_roads_file
    from answersheet.dev.sample_day import build_day_archives, sample_photos, upload_day
    from answersheet.storage import Store

    t0 = time.monotonic()
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    state = _read_state(home)
    if state and all(_ours(pid, started) for pid, started in state.get("pids", {}).values()):
        say(f"already up: {state['url']} (stop it with `make down`)")
        return state
    if state:
        down(home, say=lambda *_: None)  # leftovers of a crashed `up`
    if not _port_free(port):
        raise AnswersheetError(f"127.0.0.1:{port} is in use: stop what listens there or pick another port "
                               "(make up AIRFLOW_PORT=8081)")
    logs = home / "logs"
    state = {"home": str(home), "pids": {}, "url": f"http://127.0.0.1:{port}"}
    try:
        # 1. S3 (SeaweedFS) with fresh credentials, written to <home>/s3.env (0600), never printed.
        env_file = home / "s3.env"
        env_file.unlink(missing_ok=True)
        pid = _spawn([sys.executable, "-m", "answersheet.dev.s3server", "--dir", str(home / "s3"),
                      "--env-file", str(env_file)], dict(os.environ), logs / "s3.log")
        state["pids"]["s3"] = [pid, _started(pid)]
        _write_state(home, state)
        _wait("local S3", lambda: env_file.is_file() and "AWS_SECRET_ACCESS_KEY" in env_file.read_text(), 90, pid,
              logs / "s3.log")  # written once the server answers
        s3_env = _read_env_file(env_file)
        os.environ.update(s3_env)

        # 2. The roads file of this home: the local bucket and the weights' sha256 (as `make demo` does).
        road = road or read_roads_file(roads_src)[0]["id"]
        bucket = load_road(roads_src, road).bucket
        weights, real = demo_weights(home)
        data = weights.read_bytes()
        roads = effective_roads_file(roads_src, road, bucket, hashlib.sha256(data).hexdigest(), home / "roads.yaml")
        timezone = load_road(roads, road).schedule.get("timezone", "Asia/Seoul")

        # 3. The Airflow home (migrated once) and what every component and Airflow command gets: DAGs in
        # local mode, the S3 settings, the api-server on 127.0.0.1 (UI, REST and the tasks' execution API).
        env = {**prepare_airflow_home(home, roads, {**os.environ}), **s3_env,
               "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
               "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin"}

        # 4. Sample days in S3 and their backfill, before the components start: SQLite takes one writer at
        # a time, and `airflow backfill create` next to a starting scheduler and DAG processor failed
        # with "database is locked". The days: the last `days` ones Airflow can backfill now.
        store = Store(bucket)
        errors = store.client.exceptions
        try:
            store.client.create_bucket(Bucket=bucket)
        except (errors.BucketAlreadyOwnedByYou, errors.BucketAlreadyExists):
            pass  # a second `up` on the same home
        store.put(WEIGHTS_KEY, data)
        log_path = home / "up-backfill.log"
        code, tail = run_airflow(["dags", "reserialize"], env, log_path)
        if code:
            raise AnswersheetError(f"airflow dags reserialize failed (log {log_path}):\n" + "\n".join(tail))
        today = dt.date.today()
        candidates = dry_run_days(env, log_path, roads, road, today - dt.timedelta(days=7 * ((days + 4) // 5) + 7),
                                  today, timezone)
        week = candidates[-days:]
        if not week:
            raise AnswersheetError(f"no day of road {road} can be backfilled before {today} (schedule.start_date?)")
        cfg = load_road(roads, road)
        photos = sample_photos()
        for i, day in enumerate(week):
            short = {sets // 2: ["rear"]} if i == 0 else None  # one short set, as the seed's data had
            upload_day(store, road, dt.date.fromisoformat(day),
                       build_day_archives(road, dt.date.fromisoformat(day), cfg.cameras, sets, photos,
                                          short_sets=short))
        # All days at once: on a laptop the week goes green sooner than one day after the other.
        code, tail = run_airflow(backfill_args(roads, road, week[0], week[-1], reprocess="failed",
                                               max_active_runs=len(week)), env, log_path)
        # A second `up` on the same home: every day done ("No runs to create"), or the first `up`'s backfill
        # is still open (the scheduler closes it, once running, a little after its last run).
        settled = ("No runs to create", "Another backfill is running")
        if code and not any(mark in line for line in tail for mark in settled):
            raise AnswersheetError(f"airflow backfill create failed (log {log_path}):\n" + "\n".join(tail))
        code, tail = run_airflow(["dags", "unpause", f"answersheet_{road}"], env, log_path)
        if code:
            raise AnswersheetError(f"airflow dags unpause failed (log {log_path}):\n" + "\n".join(tail))
        state.update(road=road, days=week, real_weights=real, dag_id=f"answersheet_{road}")

        # 5. The four components, each in its own session (its PID is its process group, for `down`).
        for name in COMPONENTS:
            args = ["api-server", "--host", "127.0.0.1", "--port", str(port)] if name == "api-server" else [name]
            pid = _spawn([sys.executable, "-m", "airflow", *args], env, logs / f"{name}.log")
            state["pids"][name] = [pid, _started(pid)]
            _write_state(home, state)

        api = state["pids"]["api-server"][0]
        _wait("Airflow api-server", lambda: _http_ok(f"{state['url']}/api/v2/monitor/health"), 180, api,
              logs / "api-server.log")
    except BaseException:
        down(home, say=lambda *_: None)
        raise
    passwords = home / "simple_auth_manager_passwords.json.generated"
    say(f"Airflow UI: {state['url']}  (user admin; its generated password is in {passwords})")
    say(f"backfilling {state['dag_id']}: {week[0]} .. {week[-1]} ({len(week)} days, {sets} sets each) — "
        f"watch the Grid; ready in {time.monotonic() - t0:.0f}s")
    say(f"local S3: {s3_env['AWS_ENDPOINT_URL']} (`source {env_file}` for its credentials); logs in {logs}")
    if not real:
        say("WARNING: random-init weights (no $ANSWERSHEET_WEIGHTS, no download): the labels are meaningless")
    say("stop everything: make down")
    return state


def down(home: Path, say=print) -> list[str]:
    """Stop exactly what `up` started: each recorded PID (checked to still be that command) and its process
    group, SIGTERM then SIGKILL after STOP_GRACE_S. Data (S3, Airflow DB, logs) stays in home."""
    home = Path(home).resolve()
    state = _read_state(home)
    stopped = []
    live = {name: pid for name, (pid, started) in state.get("pids", {}).items() if _ours(pid, started)}
    for pid in live.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_started(pid) for pid in live.values()):
        time.sleep(0.2)
    for name, pid in live.items():
        if _started(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append(f"{name} (pid {pid})")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_started(pid) for pid in live.values()):
        time.sleep(0.1)  # SIGKILL is delivered asynchronously
    (home / UP_STATE).unlink(missing_ok=True)
    say("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return stopped


def main(argv: list[str] | None = None) -> int:
    """`backfill-args` prints the `airflow backfill create` arguments (one shell word per argument, for the
    Makefile's kubectl exec); `backfill` runs it against a local Airflow home."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python -m answersheet.dev.local_airflow", description=__doc__.split("\n")[0])
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
    p = sub.add_parser("up", help="local Airflow + local S3 + a backfilled week of sample days")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--roads-file", type=Path, default=ROADS_FILE)
    p.add_argument("--road", default=None, help="road to backfill (default: the roads file's first)")
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--sets", type=int, default=SAMPLE_SETS)
    p = sub.add_parser("down", help="stop what `up` started (by PID)")
    p.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.home, port=args.port, roads_src=args.roads_file, road=args.road, days=args.days, sets=args.sets)
            return 0
        if args.command == "down":
            down(args.home)
            return 0
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
