"""S3/MinIO access through boto3. Endpoint and credentials come from the environment only
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as boto3 reads them; they are never logged.

An endpoint URL may carry credentials as userinfo (`http://key:secret@host`); botocore repeats the URL
in its connection errors, so every message built here goes through `redact` first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from answersheet.errors import AnswersheetError

log = logging.getLogger(__name__)

# scheme://userinfo@ — userinfo is everything up to the last '@' before the host (a password may hold '@')
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s\"'<>]*@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by `***` (credentials never printed)."""
    return _USERINFO_RE.sub(r"\1***@", text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise AnswersheetError(f"not an s3://bucket/key URI: {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class Store:
    """One bucket. Every failure becomes an AnswersheetError naming the object and the problem."""

    def __init__(self, bucket: str, client: Any = None, max_pool_connections: int = 32) -> None:
        self.bucket = bucket
        try:
            self.client = client or boto3.client(
                "s3",
                config=Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    max_pool_connections=max_pool_connections,
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        except (BotoCoreError, ValueError) as exc:  # e.g. "Invalid endpoint: <AWS_ENDPOINT_URL>"
            raise AnswersheetError(f"S3 client for bucket {bucket!r}: bad S3 settings in the environment "
                                   f"(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, …): {redact(str(exc))}") from None

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _error(self, key: str, exc: Exception, action: str) -> AnswersheetError:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            msg = exc.response.get("Error", {}).get("Message", "")
            return AnswersheetError(redact(f"{self.uri(key)}: {action} failed: {code} {msg}".rstrip()))
        return AnswersheetError(redact(f"{self.uri(key)}: {action} failed: S3 unreachable or broken ({exc})"))

    def list(self, prefix: str) -> list[ObjectInfo]:
        """All objects under prefix (paginated ListObjectsV2), sorted by key."""
        out: list[ObjectInfo] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"], int(obj["Size"]), obj["ETag"].strip('"')))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(prefix, exc, "list") from None
        return sorted(out, key=lambda o: o.key)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise self._error(key, exc, "read") from None

    def get_json(self, key: str) -> dict | None:
        """The parsed JSON object at key, or None if there is none."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(key, exc, "read") from None
        except BotoCoreError as exc:
            raise self._error(key, exc, "read") from None
        try:
            return json.loads(body)
        except ValueError:
            raise AnswersheetError(f"{self.uri(key)}: not valid JSON") from None

    def download(self, key: str, fileobj: IO[bytes]) -> None:
        """Stream an object into a file (multipart, never whole in memory)."""
        try:
            self.client.download_fileobj(self.bucket, key, fileobj)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(key, exc, "download") from None

    def head_metadata(self, key: str) -> dict[str, str] | None:
        """The object's user metadata (x-amz-meta-*, lowercase keys), or None if there is no object."""
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key).get("Metadata") or {})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._error(key, exc, "head") from None
        except BotoCoreError as exc:
            raise self._error(key, exc, "head") from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> str:
        """Write one object whole (with optional x-amz-meta-* metadata); returns its sha256."""
        extra = {"Metadata": metadata} if metadata else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(key, exc, "write") from None
        return sha256_bytes(data)

    def put_json(self, key: str, obj: Any, metadata: dict[str, str] | None = None) -> str:
        data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        return self.put(key, data, "application/json", metadata)

    def copy(self, src_key: str, dst_key: str) -> None:
        try:
            self.client.copy_object(
                Bucket=self.bucket, Key=dst_key, CopySource={"Bucket": self.bucket, "Key": src_key}
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(src_key, exc, f"copy to {dst_key}") from None

    def delete(self, keys: Iterable[str]) -> int:
        """Delete keys in batches of 1000; returns how many were asked for."""
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except (BotoCoreError, ClientError) as exc:
                raise self._error(keys[i], exc, "delete") from None
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise AnswersheetError(f"{self.uri(err['Key'])}: delete failed: {err.get('Code')}")
        return len(keys)

    def presign(self, key: str, expiry_s: int) -> str:
        """A presigned GET URL for key, valid expiry_s seconds (signed locally: no request is made). SigV4,
        whose X-Amz-Expires every S3 service honours (botocore's default presign is SigV2 for custom endpoints)."""
        try:
            signer = boto3.client("s3", endpoint_url=self.client.meta.endpoint_url,
                                  region_name=self.client.meta.region_name,
                                  config=Config(signature_version="s3v4"))
            return signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expiry_s)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(key, exc, "presign") from None

    def delete_stale(self, prefix: str, keep: set[str]) -> int:
        """Delete every object under prefix that is not in keep (re-runs leave no leftovers)."""
        stale = [o.key for o in self.list(prefix) if o.key not in keep]
        if stale:
            log.info("removing %d stale object(s) under %s", len(stale), self.uri(prefix))
            self.delete(stale)
        return len(stale)


# S3 requests in flight when a stage after ingest copies or writes many small objects (preprocess's empty
# labels, the answer sheet's image and label copies). It used to be the road's `ingest.workers`, whose
# default it keeps (16); that setting now sizes ingest's uploads only.
S3_WORKERS = 16


def run_bounded(tasks: Iterable[Callable[[], Any]], workers: int, on_done: Callable[[Any], None] | None = None) -> None:
    """Run callables on a thread pool with at most 2*workers in flight (memory stays bounded).

    The first exception cancels what is queued and is re-raised.
    """
    in_flight: set[Future] = set()

    def drain(block_until: int) -> None:
        nonlocal in_flight
        while len(in_flight) > block_until:
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in done:
                result = fut.result()
                if on_done:
                    on_done(result)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for task in tasks:
                in_flight.add(pool.submit(task))
                drain(2 * workers)
            drain(0)
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            raise

