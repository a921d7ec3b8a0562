"""`make up` / `make down` for real: a local Airflow (api-server on 127.0.0.1, scheduler, dag-processor,
triggerer) and a local S3 server start; the backfilled week of sample days goes green, as seen through
Airflow's REST API; each day's answer sheet and asset event exist; `make down` stops exactly the processes
`make up` started."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zoneinfo
from pathlib import Path

import pytest
from conftest import REAL_WEIGHTS, REPO

RUNS_TIMEOUT_S = 1200  # five days on a 2-core CPU box shared with other work; ~3 min on a laptop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "-o", "install", f"VENV={sys.prefix}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


class Rest:
    """Airflow's public REST API (v2) with a JWT from the simple auth manager's /auth/token."""

    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        body = json.dumps({"username": "admin", "password": password}).encode()
        req = urllib.request.Request(f"{url}/auth/token", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.token = json.load(resp)["access_token"]

    def get(self, path: str) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (/proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie); the state follows the parenthesised command name, which may hold spaces."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture
def user_env(tmp_path, tiny_weights) -> dict[str, str]:
    """A user's shell: no AIRFLOW_*/AWS_* from this session; real weights when present, else the tiny ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "ANSWERSHEET_"))}
    env["ANSWERSHEET_WEIGHTS"] = str(REAL_WEIGHTS if REAL_WEIGHTS.is_file() else tiny_weights[0])
    return env


def test_make_up_backfills_a_green_week_seen_through_the_rest_api_and_make_down_stops_it(tmp_path, user_env):
    home, port = tmp_path / "airflow", free_port()
    t0 = time.monotonic()
    up = make("up", f"AIRFLOW_LOCAL_HOME={home}", f"AIRFLOW_PORT={port}", env=user_env)
    up_s = time.monotonic() - t0
    state = json.loads((home / "up.json").read_text()) if (home / "up.json").is_file() else {}
    try:
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        assert f"Airflow UI: http://127.0.0.1:{port}" in up.stdout and "make down" in up.stdout
        assert "AWS_SECRET_ACCESS_KEY" not in up.stdout + up.stderr  # credentials stay in the 0600 env file
        assert set(state["pids"]) == {"s3", "api-server", "scheduler", "dag-processor", "triggerer"}
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        days = state["days"]
        assert len(days) == 5 and all(dt.date.fromisoformat(d).weekday() < 5 for d in days)

        rest = Rest(state["url"], home)
        dag_id = state["dag_id"]
        deadline = time.monotonic() + RUNS_TIMEOUT_S
        while True:
            runs = rest.get(f"/api/v2/dags/{dag_id}/dagRuns?order_by=logical_date&limit=50")["dag_runs"]
            states = [r["state"] for r in runs]
            if runs and all(s in ("success", "failed") for s in states) or time.monotonic() > deadline:
                break
            time.sleep(5)
        green_s = time.monotonic() - t0
        kst = zoneinfo.ZoneInfo("Asia/Seoul")
        processed = [dt.datetime.fromisoformat(r["logical_date"]).astimezone(kst).date().isoformat() for r in runs]
        assert processed == days and {r["run_type"] for r in runs} == {"backfill"}
        assert states == ["success"] * 5, json.dumps(runs, indent=1)[-3000:]
        first_runs = runs
        for run in runs:  # every stage of every day green
            tis = rest.get(f"/api/v2/dags/{dag_id}/dagRuns/{run['dag_run_id']}/taskInstances")["task_instances"]
            assert {t["task_id"]: t["state"] for t in tis} == dict.fromkeys(
                ("ingest", "detect", "preprocess", "datasheet"), "success")

        events = rest.get(f"/api/v2/assets/events?source_dag_id={dag_id}&limit=50")["asset_events"]
        assert sorted(e["extra"]["date"] for e in events) == days
        assert {e["extra"]["unchanged"] for e in events} == {False}

        s3 = {line.split("=", 1)[0].removeprefix("export "): line.split("=", 1)[1]
              for line in (home / "s3.env").read_text().splitlines()}
        import boto3

        client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        for day in days:
            key = f"answersheet/{state['road']}/{day.replace('-', '')}/manifest.json"
            sheet = json.loads(client.get_object(Bucket="answersheet", Key=key)["Body"].read())
            assert sheet["date"] == day and sheet["counts"]["sets"] == 4
        print(f"make up: UI ready in {up_s:.0f}s, week green in {green_s:.0f}s")
    finally:
        down = make("down", f"AIRFLOW_LOCAL_HOME={home}", env=user_env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped: s3" in down.stdout
    assert not [name for name, (pid, _) in state["pids"].items() if alive(pid)]
    assert not listening_addresses(port)
    again = make("down", f"AIRFLOW_LOCAL_HOME={home}", env=user_env, timeout=120)
    assert "nothing was running" in again.stdout

    # The next day: `make up` on the same home brings the green week back and re-runs nothing.
    up = make("up", f"AIRFLOW_LOCAL_HOME={home}", f"AIRFLOW_PORT={port}", env=user_env)
    try:
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        restarted = json.loads((home / "up.json").read_text())
        assert restarted["days"] == days
        runs = Rest(restarted["url"], home).get(f"/api/v2/dags/{dag_id}/dagRuns?limit=50")["dag_runs"]
        assert sorted((r["logical_date"], r["state"]) for r in runs) == sorted(
            (r["logical_date"], "success") for r in first_runs)
    finally:
        make("down", f"AIRFLOW_LOCAL_HOME={home}", env=user_env, timeout=120)


def test_make_up_on_a_busy_port_says_so_in_one_line_and_starts_nothing(tmp_path, user_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = make("up", f"AIRFLOW_LOCAL_HOME={tmp_path / 'airflow'}", f"AIRFLOW_PORT={port}", env=user_env)
    assert proc.returncode != 0
    assert f"answersheet: error: 127.0.0.1:{port} is in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "airflow" / "up.json").exists()
