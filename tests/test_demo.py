"""`make demo`'s program end to end (CLI runner; the Airflow runner is covered by the DAG e2e test)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import REAL_WEIGHTS


def test_demo_writes_answer_sheet_and_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    if REAL_WEIGHTS.is_file():
        env["ANSWERSHEET_WEIGHTS"] = str(REAL_WEIGHTS)
    out = tmp_path / "demo-output"
    proc = subprocess.run([sys.executable, "-m", "answersheet.dev.demo", "--runner", "cli", "--out", str(out),
                           "--sets", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sheet = out / "daewang_pangyo" / "20261102"
    summary = proc.stdout
    assert f"answer sheet: 대왕판교 (daewang_pangyo) 2026-11-02 -> {sheet}" in summary
    assert "images 17 in 3 sets" in summary and "short sets 1" in summary
    assert "short set daewang_pangyo_20261102_090007: missing rear (policy fill)" in summary
    manifest = json.loads((sheet / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["images"] == 17 and manifest["counts"]["boxes"] > 0
    rows = list(csv.DictReader(io.StringIO((sheet / "datasheet.csv").read_text(encoding="utf-8-sig"))))
    assert len(rows) == 18
    # labels: the side cameras the detector looked at, plus the fill policy's placeholder for the missing rear;
    # none for the not_detected cameras (an empty label file would say "no objects")
    assert len(list((sheet / "images").iterdir())) == 17 and len(list((sheet / "labels").iterdir())) == 7
    labels = {p.stem for p in (sheet / "labels").iterdir()}
    assert not any(r["status"] == "not_detected" and r["image"][7:-4] in labels for r in rows)
    assert (sheet / "report.html").read_text(encoding="utf-8").count("<figure>") >= 1
    from answersheet.dev.demo import EXPORTS

    assert all((sheet / e).is_file() for e in EXPORTS) and "exports: " + ", ".join(EXPORTS) in summary
    if not REAL_WEIGHTS.is_file() and "ANSWERSHEET_WEIGHTS" not in os.environ:
        assert "RANDOMLY INITIALISED" in proc.stderr


@pytest.mark.fast
def test_a_sample_day_packs_to_the_same_bytes(tmp_path):
    """Members are stamped with their capture time, not the packing time: the same day is the same archive
    bytes (and ETag), so a re-run demo or test repeats every stage's input digest."""
    import datetime as dt
    import zipfile

    from PIL import Image

    from answersheet.dev.sample_day import build_day_archives

    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (90, 120, 150)).save(photo)
    archives = build_day_archives("r", dt.date(2026, 11, 2), ["front", "side1"], 3, [photo])
    (member,) = [m for m in zipfile.ZipFile(io.BytesIO(archives["side1.zip"])).infolist() if "_090014_" in m.filename]
    assert member.date_time == (2026, 11, 2, 9, 0, 14) and member.external_attr == 0o600 << 16
    assert build_day_archives("r", dt.date(2026, 11, 2), ["front", "side1"], 3, [photo]) == archives
