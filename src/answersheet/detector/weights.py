"""Model files (a local path or an s3:// URI) fetched into scratch and checked against their sha256 (torch-free)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from answersheet.errors import AnswersheetError

CHUNK = 1024 * 1024


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch_verified(uri: str, sha256: str | None, scratch: str | os.PathLike, what: str = "detect.sha256") -> Path:
    """A local copy of a model file given as a local path or an s3:// URI, verified against `sha256`.

    s3:// objects are downloaded through Store (any bucket) into `scratch`; local files are used in place.
    A missing file or a digest other than `sha256` raises AnswersheetError naming the file and both digests;
    `sha256=None` only fetches (`export-onnx` without --sha256).
    """
    if uri.startswith("s3://"):
        from answersheet.storage import Store, split_s3_uri

        bucket, key = split_s3_uri(uri)
        path = Path(scratch) / (key.rsplit("/", 1)[-1] or "model")
        with open(path, "wb") as f:
            Store(bucket).download(key, f)
    else:
        path = Path(uri).expanduser().resolve()
        if not path.is_file():
            raise AnswersheetError(f"{uri}: model file not found")
    if sha256 is None:
        return path
    actual = file_sha256(path)
    if actual != sha256:
        raise AnswersheetError(
            f"{uri}: sha256 mismatch: the file has {actual} but {what} is {sha256} "
            "(wrong or corrupted model file, or a stale digest in the roads file)"
        )
    return path
