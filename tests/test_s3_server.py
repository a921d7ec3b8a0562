"""The stages against a real S3 server with auth on (SeaweedFS) and through the fault proxy: wrong secrets,
denied writes, 5xx, resets and outages each end in one line naming the object — never a secret, never a
traceback — or, where S3 clients retry, in a finished stage. moto cannot produce these (it accepts any secret)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import DAY, ROAD, write_roads_file

from answersheet.dev.sample_day import build_day_archives, upload_day
from answersheet.layout import DayLayout

CAMERAS = ("front", "rear", "left", "right", "side1", "side2")
LAYOUT = DayLayout(ROAD, DAY)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "answersheet.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=180)


def ingest(roads, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli("ingest", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads), env=env)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def day(store, tmp_path, photos):
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, CAMERAS, 2, photos))
    return write_roads_file(tmp_path / "roads.yaml", store.bucket)


def test_wrong_secret_is_refused_in_one_line_without_the_secret(store, tmp_path, photos, s3_server):
    roads = day(store, tmp_path, photos)
    secret = "wr0ng-s3cret-never-printed"
    proc = ingest(roads, env={"AWS_SECRET_ACCESS_KEY": secret, "AWS_MAX_ATTEMPTS": "1"})
    last = one_error_line(proc)
    assert last.startswith(f"answersheet: error: s3://{store.bucket}/raw/{ROAD}/")
    assert "SignatureDoesNotMatch" in last or "AccessDenied" in last
    assert secret not in proc.stderr + proc.stdout
    assert s3_server.identities["admin"].secret_key not in proc.stderr + proc.stdout


def test_unknown_access_key_is_refused(store, tmp_path, photos):
    roads = day(store, tmp_path, photos)
    proc = ingest(roads, env={"AWS_ACCESS_KEY_ID": "AKNOSUCHKEY000", "AWS_MAX_ATTEMPTS": "1"})
    assert "InvalidAccessKeyId" in one_error_line(proc)


def test_read_only_identity_cannot_write_and_nothing_looks_complete(store, tmp_path, photos, s3_server):
    roads = day(store, tmp_path, photos)
    proc = ingest(roads, env=s3_server.env("reader"))
    last = one_error_line(proc)
    assert f"s3://{store.bucket}/work/{ROAD}/" in last and "AccessDenied" in last
    assert not store.list(LAYOUT.ingest_manifest)


def test_transient_503s_are_retried_and_the_stage_finishes(store, tmp_path, photos, fault_proxy):
    roads = day(store, tmp_path, photos)
    fault_proxy.add("status:503", method="PUT", path_contains="/ingest/images/", times=3)
    proc = ingest(roads, env={"AWS_ENDPOINT_URL": fault_proxy.url})
    assert proc.returncode == 0, proc.stderr
    assert all(rule.hits == rule.times for rule in fault_proxy.rules)
    assert store.get_json(LAYOUT.ingest_manifest)["counts"]["images"] == 12


def test_outage_mid_stage_is_one_line_and_a_rerun_finishes(store, tmp_path, photos, fault_proxy):
    roads = day(store, tmp_path, photos)
    fault_proxy.down()
    proc = ingest(roads, env={"AWS_ENDPOINT_URL": fault_proxy.url, "AWS_MAX_ATTEMPTS": "2"})
    last = one_error_line(proc)
    assert last.startswith(f"answersheet: error: s3://{store.bucket}/") and "S3 unreachable" in last
    fault_proxy.up()
    assert ingest(roads, env={"AWS_ENDPOINT_URL": fault_proxy.url}).returncode == 0
    assert store.get_json(LAYOUT.ingest_manifest)["counts"]["images"] == 12


def test_proxy_passes_requests_through_unchanged(store, fault_proxy):
    """The proxy itself: signed requests verify upstream, bodies round-trip, a corrupt rule flips bytes."""
    import boto3

    client = boto3.client("s3", endpoint_url=fault_proxy.url)
    body = bytes(range(256)) * 40
    client.put_object(Bucket=store.bucket, Key="p/x.bin", Body=body)
    assert client.get_object(Bucket=store.bucket, Key="p/x.bin")["Body"].read() == body
    fault_proxy.add("corrupt", path_contains="/p/x.bin")
    got = client.get_object(Bucket=store.bucket, Key="p/x.bin", ChecksumMode="DISABLED")["Body"].read()
    assert len(got) == len(body) and got != body
