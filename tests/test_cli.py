"""The CLI's contract: one-line errors naming the object, exit codes, credentials never printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import DAY, ROAD, ROADS_FILE, write_roads_file

from answersheet.cli import build_parser

pytestmark = pytest.mark.fast


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "answersheet.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_hygiene_endpoint_userinfo_is_redacted(tmp_path):
    """Credentials embedded in AWS_ENDPOINT_URL (http://key:secret@host) never reach the terminal: botocore
    repeats the URL in its connection error, and in its DEBUG request lines."""
    secret = "pa55w0rd-in-the-url"
    env = {"AWS_ENDPOINT_URL": f"http://urlkey:{secret}@127.0.0.1:{closed_port()}", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    for level in ("INFO", "DEBUG"):
        proc = cli("--log-level", level, "ingest", "--road", ROAD, "--date", DAY.isoformat(),
                   "--config", str(ROADS_FILE), env=env)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("answersheet: error: s3://answersheet/raw/daewang_pangyo/20261102/") and "***@" in last
        assert secret not in proc.stderr + proc.stdout, level
        assert "urlkey" not in proc.stderr + proc.stdout, level
        assert "s3cr3t-never-printed" not in proc.stderr + proc.stdout, level


def test_hygiene_malformed_endpoint_is_one_line():
    env = {"AWS_ENDPOINT_URL": "http://k:pw-in-url@[::1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = cli("ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(ROADS_FILE), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("answersheet: error: S3 client for bucket 'answersheet'")
    assert "pw-in-url" not in proc.stderr


def _config_error(config: str) -> str:
    proc = cli("ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", config)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # nothing else printed: one line
    return lines[0]


def test_item6_config_errors_are_one_line_via_the_cli(tmp_path):
    import yaml

    doc = yaml.safe_load(ROADS_FILE.read_text(encoding="utf-8"))
    cp949 = tmp_path / "cp949.yaml"
    cp949.write_bytes(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode("cp949"))
    assert _config_error(str(cp949)).startswith(f"answersheet: error: {cp949}: line ")
    assert _config_error(str(tmp_path)) == f"answersheet: error: {tmp_path}: is a directory, not a roads file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("roads:\n  - id: x\n   name: y\n", encoding="utf-8")
    assert _config_error(str(bad)).startswith(f"answersheet: error: {bad}: line 3, column ")
    nan = write_roads_file(tmp_path / "nan.yaml", "answersheet", detect={"conf_thres": float("nan")})
    assert _config_error(str(nan)) == (f"answersheet: error: {nan}: road '{ROAD}': key 'detect.conf_thres': "
                                       "must be a finite number in [0, 1], got nan")
