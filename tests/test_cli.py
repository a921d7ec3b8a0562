"""The CLI's contract: one-line errors naming the object, exit codes, credentials never printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import DAY, ROAD, ROADS_FILE, write_roads_file

from answersheet.cli import build_parser


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "answersheet.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_s3_outage_is_one_line_naming_the_object_and_no_secret(tmp_path):
    secret = "s3cr3t-never-printed"
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2"}
    proc = cli("ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(ROADS_FILE), env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("answersheet: error: s3://answersheet/raw/daewang_pangyo/20261102/")
    assert "S3 unreachable" in last
    assert secret not in proc.stderr + proc.stdout


def test_missing_bucket_names_the_bucket(store, tmp_path):
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket)
    proc = cli("preprocess", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads),
               "--bucket", "no-such-bucket-here")
    assert proc.returncode == 1
    assert "s3://no-such-bucket-here/" in proc.stderr and "NoSuchBucket" in proc.stderr


def test_bad_arguments_and_config_errors():
    proc = cli("ingest", "--road", ROAD, "--date", "02/11/2026", "--config", str(ROADS_FILE))
    assert proc.returncode == 1 and "--date must be YYYY-MM-DD" in proc.stderr
    proc = cli("ingest", "--road", "nowhere", "--date", "2026-11-02", "--config", str(ROADS_FILE))
    assert proc.returncode == 1 and "road 'nowhere' not found" in proc.stderr
    proc = cli("ingest", "--road", ROAD, "--date", "2026-11-02", env={"ANSWERSHEET_CONFIG": ""})
    assert proc.returncode == 1 and "no roads file" in proc.stderr
    proc = cli("nosuchstage", "--road", ROAD)
    assert proc.returncode == 2


def test_parser_covers_every_stage():
    parser = build_parser()
    for stage in ("ingest", "detect", "preprocess", "datasheet", "run"):
        args = parser.parse_args([stage, "--road", ROAD, "--date", "2026-11-02"])
        assert args.command == stage and args.road == ROAD


def test_output_hygiene_error_line_never_carries_a_control_character(tmp_path):
    """Whatever an error message quotes (here a --config path with ESC sequences, CR and a newline), the
    error is one line with the characters escaped: nothing clears or recolours the terminal."""
    path = tmp_path / "\x1b[2J\x1b[31mroads\r\nanswersheet: ok.yaml"
    proc = cli("ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(path))
    assert proc.returncode == 1
    assert not any(c in proc.stderr for c in "\x1b\r")
    [line] = proc.stderr.splitlines()
    assert line.startswith("answersheet: error: ") and r"\x1b[2J\x1b[31mroads\r\nanswersheet: ok.yaml" in line
