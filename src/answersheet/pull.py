"""`answersheet pull --road R --date D --out DIR`: download a published answer sheet, verified.

The sheet's manifest lists every object with its sha256. Each object streams to `<file>.part`, is hashed
while it is written and renamed into place only when its sha256 matches; a mismatch removes the part file and
fails naming the object. A file already present with the right sha256 is not downloaded again, so an
interrupted pull resumes. Files under DIR that the manifest does not list are left alone and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from answersheet.errors import AnswersheetError
from answersheet.layout import DayLayout
from answersheet.progress import Progress
from answersheet.storage import Store, run_bounded

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(store: Store, key: str, dest: Path, sha: str) -> int:
    """Download one object to dest via dest.part; returns its size. Raises naming the object on a bad digest."""
    if dest.is_file() and file_sha256(dest) == sha:
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        body = store.get(key)  # answer-sheet objects are images and small files: one GET each
        got = hashlib.sha256(body).hexdigest()
        if got != sha:
            raise AnswersheetError(f"{store.uri(key)}: sha256 {got} does not match the manifest's {sha}; "
                                   "the sheet changed or is corrupt (re-run the datasheet stage, then pull again)")
        part.write_bytes(body)
        os.replace(part, dest)
        return len(body)
    finally:
        part.unlink(missing_ok=True)


def set_data_yaml_path(sheet_dir: Path) -> None:
    """Write the sheet's absolute directory into data.yaml's `path`: yolov5 resolves a relative (or missing)
    `path` against its own package directory, not the yaml's."""
    p = sheet_dir / "data.yaml"
    if not p.is_file():
        return
    text = p.read_text(encoding="utf-8")
    head = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    doc = yaml.safe_load(text)
    doc = {"path": str(sheet_dir.resolve()), **{k: v for k, v in doc.items() if k != "path"}}
    p.write_text(head + yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")


def pull(store: Store, road: str, day: Any, out: Path, workers: int = 8) -> dict[str, Any]:
    """Download answersheet/<road>/<ymd>/ into out/, every object checked against the manifest."""
    lay = DayLayout(road, day)
    manifest = store.get_json(lay.out_manifest)
    if manifest is None:
        raise AnswersheetError(f"{store.uri(lay.out_manifest)}: missing — no published answer sheet for "
                               f"{road} on {day} (run the datasheet stage first)")
    outputs: dict[str, str] = manifest.get("outputs", {})
    root = out.resolve()
    foreign = [k for k in outputs if not k.startswith(lay.out_prefix)
               or not (root / k[len(lay.out_prefix):]).resolve().is_relative_to(root)]
    if foreign:
        raise AnswersheetError(f"{store.uri(lay.out_manifest)}: lists objects outside the sheet, e.g. {foreign[0]!r}; "
                               "nothing downloaded")
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(f"pull {road} {day}", len(outputs), unit="obj")
    sizes: list[int] = []

    def task(key: str, sha: str):
        return lambda: _fetch(store, key, out / key[len(lay.out_prefix):], sha)

    def done(n: int) -> None:
        sizes.append(n)
        progress.advance()

    run_bounded((task(k, s) for k, s in sorted(outputs.items())), workers, on_done=done)
    progress.finish()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    set_data_yaml_path(out)
    listed = {out / k[len(lay.out_prefix):] for k in outputs} | {out / "manifest.json"}
    extra = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p not in listed)
    if extra:
        log.warning("pull: %d file(s) under %s are not part of the sheet (left alone), e.g. %s", len(extra), out,
                    extra[0])
    return {"out": str(out), "objects": len(outputs), "downloaded": sum(1 for n in sizes if n),
            "bytes": sum(sizes), "verified": len(outputs), "not_in_sheet": len(extra)}
