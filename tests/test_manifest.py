"""The manifest protocol every stage goes through (issue 8 items 1 and 2), on a real S3 server: a stage
skips only when its outputs are still there as committed, and refuses upstream manifests built from
outputs that are no longer the current ones."""

from __future__ import annotations

import contextlib
import datetime as dt
import time

import pytest
from conftest import write_roads_file

from answersheet import manifest, stage
from answersheet.config import load_road
from answersheet.day import RoadDay
from answersheet.errors import AnswersheetError

PREFIX = "work/r/20261102/"


def _commit(store, stage: str, outputs: dict[str, bytes], upstream=None) -> dict:
    key = f"{PREFIX}{stage}/manifest.json"
    digests = {k: store.put(k, v) for k, v in outputs.items()}
    return manifest.commit(store, key, stage, "d-" + stage, digests, {}, time.monotonic(), upstream=upstream)


def test_item2_skip_only_when_outputs_are_there_as_committed(store):
    outputs = {f"{PREFIX}ingest/images/{i}.jpg": f"image {i}".encode() for i in range(3)}
    m = _commit(store, "ingest", outputs)
    key = f"{PREFIX}ingest/manifest.json"
    assert m["listing_prefix"] == f"{PREFIX}ingest/images/" and len(m["stored"]) == 3
    assert manifest.current(store, key, "d-ingest", force=False) is not None
    assert manifest.current(store, key, "other", force=False) is None
    assert manifest.current(store, key, "d-ingest", force=True) is None
    victim = sorted(outputs)[1]
    store.put(victim, b"image X")  # same size, other bytes: the ETag differs
    assert manifest.missing_outputs(store, store.get_json(key)) == [victim]
    assert manifest.current(store, key, "d-ingest", force=False) is None
    store.delete([victim])
    assert manifest.missing_outputs(store, store.get_json(key)) == [victim]


def test_item2_manifest_without_a_storage_record_is_redone(store):
    _commit(store, "ingest", {f"{PREFIX}ingest/images/a.jpg": b"a"})
    key = f"{PREFIX}ingest/manifest.json"
    old = store.get_json(key)
    del old["stored"]
    store.put_json(key, old)
    assert manifest.current(store, key, "d-ingest", force=False) is None


def test_item2_commit_refuses_an_output_that_is_not_in_storage(store):
    with pytest.raises(AnswersheetError, match=r"ingest/images/b.jpg: written by ingest but not in storage"):
        manifest.commit(store, f"{PREFIX}ingest/manifest.json", "ingest", "d", {f"{PREFIX}ingest/images/b.jpg": "0"},
                        {}, time.monotonic())
    assert store.get_json(f"{PREFIX}ingest/manifest.json") is None


def test_item1_digest_chain(store):
    ingest_key = f"{PREFIX}ingest/manifest.json"
    ingest = _commit(store, "ingest", {f"{PREFIX}ingest/images/a.jpg": b"a"})
    assert manifest.published_digest(store, ingest_key) == ingest["outputs_digest"]  # one HEAD
    detect = _commit(store, "detect", {f"{PREFIX}detect/labels/a.txt": b"0 .5 .5 .1 .1\n"},
                     upstream=manifest.upstream({ingest_key: ingest}))
    detect_key = f"{PREFIX}detect/manifest.json"
    manifest.check_upstream(store, detect_key, detect, expect=[ingest_key])
    manifest.check_upstream(store, detect_key, detect, expect=[ingest_key], known={ingest_key: ingest})

    _commit(store, "ingest", {f"{PREFIX}ingest/images/a.jpg": b"new a"})  # re-ingested: other photo
    with pytest.raises(AnswersheetError) as err:
        manifest.check_upstream(store, detect_key, detect, expect=[ingest_key])
    assert str(err.value).startswith(f"{store.uri(detect_key)} was built from an older ingest (outputs ")
    assert str(err.value).endswith("re-run detect for this day")

    with pytest.raises(AnswersheetError, match="has no record of the .* re-run detect for this day"):
        manifest.check_upstream(store, detect_key, {**detect, "upstream": []}, expect=[ingest_key])
    store.delete([ingest_key])
    with pytest.raises(AnswersheetError, match="which is gone; re-run ingest, then detect, for this day"):
        manifest.check_upstream(store, detect_key, detect, expect=[ingest_key])


@pytest.mark.fast
def test_item1_rerun_names_every_stage_between():
    assert manifest._rerun("ingest", "detect") == "detect"
    assert manifest._rerun("ingest", "preprocess") == "detect and preprocess"
    assert manifest._rerun("ingest", "datasheet") == "detect, preprocess and datasheet"


def test_stage_runner_contract(store, tmp_path):
    """answersheet.stage: stale objects go, the manifest is written last with the stage's records, a current
    stage skips with its old counts, a missing output makes it redo, and a failing setup (detect's model
    load) leaves the old manifest in place."""
    road = load_road(write_roads_file(tmp_path / "roads.yaml", store.bucket), "daewang_pangyo")
    rd = RoadDay(road=road, day=dt.date(2026, 11, 2), store=store)
    owns, key = f"{PREFIX}toy/out/", f"{PREFIX}toy/manifest.json"
    store.put(owns + "stale.txt", b"left by an earlier run")
    calls = []

    def work() -> stage.StageResult:
        calls.append(store.get_json(key))  # begin ran first: no manifest while the stage works
        outputs = {owns + n: store.put(owns + n, n.encode()) for n in ("a.txt", "b.txt")}
        return stage.StageResult(outputs, {"n": 2}, records={"rows": [1, 2]}, summary={"extra": 1})

    toy = stage.Stage("toy", key, "digest-1", owns=owns, summary={"shard": 0})
    first = stage.run(rd, toy, work)
    assert first == {"manifest": store.uri(key), "counts": {"n": 2}, "skipped": False, "shard": 0, "extra": 1}
    assert calls == [None] and sorted(o.key for o in store.list(owns)) == [owns + "a.txt", owns + "b.txt"]
    committed = store.get_json(key)
    assert committed["stage"] == "toy" and committed["rows"] == [1, 2] and committed["upstream"] == []
    assert stage.run(rd, toy, work) == {"manifest": store.uri(key), "counts": {"n": 2}, "skipped": True, "shard": 0}
    assert len(calls) == 1
    store.delete([owns + "b.txt"])
    assert stage.run(rd, toy, work)["skipped"] is False and len(calls) == 2

    @contextlib.contextmanager
    def broken_setup():
        raise AnswersheetError("model: not a class of the model")
        yield

    with pytest.raises(AnswersheetError, match="not a class"):
        stage.run(rd, stage.Stage("toy", key, "digest-2", owns=owns, setup=broken_setup), lambda ready: None)
    assert store.get_json(key)["inputs_digest"] == "digest-1"
