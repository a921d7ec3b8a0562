"""detect on a real S3 server with real yolov5 inference: labels equal `yolov5 detect`'s, backends agree,
sharding, idempotence, corrupt images, OOM fallback, weights verification.

Days are ingested with the real ingest stage from real photos (the shared road samples at their
own sizes, plus bus.jpg). Most tests use the tiny random-init model (`tiny_weights`); the checks
against the `yolov5 detect` CLI use the real COCO weights and skip when they are absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DAY, REAL_WEIGHTS, ROAD, SHARED, real_photos, write_roads_file

from answersheet.cli import main
from answersheet.config import load_road
from answersheet.day import RoadDay
from answersheet.dev.label_agreement import agreement
from answersheet.dev.sample_day import build_day_archives, upload_day
from answersheet.errors import AnswersheetError
from answersheet.ingest import ingest_day
from answersheet.layout import DayLayout
from answersheet.storage import Store

CAMERAS = ("side1", "side2")
N_SETS = 11  # 22 images: every photo once, several sizes, so batches group by shape
LAYOUT = DayLayout(ROAD, DAY)
BUS = SHARED / "samples" / "bus.jpg"
TINY = {"conf_thres": 0.25, "imgsz": 320, "max_det": 100}  # the tiny model: tens of boxes per photo
# The example road maps to road classes at its own settings; these tests check `yolov5 detect`'s output.
IDENTITY = {"class_map": "identity", "class_conf_thres": None, "slices": None, "agnostic_nms": None, "imgsz": 640}
COCO80 = yaml.safe_load((Path(__file__).parents[1] / "dags" / "roads.yaml").read_text())["defaults"]["classes"]


def write_identity_roads(path: Path, bucket: str, detect: dict, **road) -> Path:
    """The shipped roads file with the example road in identity mode (80 COCO classes, no map, no slices)."""
    return write_roads_file(path, bucket, **{"classes": COCO80, **road}, detect={**IDENTITY, **detect})
VENV_BIN = Path(sys.executable).parent


def day_photos() -> list[Path]:
    return ([BUS] if BUS.is_file() else []) + real_photos()


def make_day(store: Store, tmp_path: Path, weights: str, sha: str, n_sets: int = N_SETS, **detect) -> Path:
    """Upload a day of archives, ingest it with the real stage; returns the roads file."""
    roads = write_identity_roads(tmp_path / "roads.yaml", store.bucket, cameras=list(CAMERAS),
                             detect={"weights": weights, "sha256": sha, "backend": "torch", **detect})
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, CAMERAS, n_sets, day_photos()))
    ingest_day(road_day(store, roads))
    return roads


def road_day(store: Store, roads: Path, force: bool = False) -> RoadDay:
    return RoadDay(road=load_road(roads, ROAD), day=DAY, store=store, force=force)


def detect_cli(roads: Path, *extra: str) -> int:
    return main(["detect", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads), *extra])


def labels(store: Store) -> dict[str, str]:
    """stem -> label text of every label file under detect/labels/."""
    prefix = LAYOUT.detect_labels
    return {o.key[len(prefix) : -len(".txt")]: store.get(o.key).decode() for o in store.list(prefix)}


def detect_manifest(store: Store, shard: int = 0, shards: int = 1) -> dict:
    return store.get_json(LAYOUT.detect_manifest(shard, shards))


def assert_agree(reference: dict[str, str], other: dict[str, str]) -> None:
    """Every box matched one-to-one (same class, IoU > 0.9). Another batch composition or backend may
    round a coordinate to the neighbouring pixel or swap two boxes whose confidences tie to the last
    float bits, so label files are not compared byte for byte here."""
    agree = agreement(reference, other)
    assert set(reference) == set(other), "the same images must have boxes"
    assert agree.matched == agree.reference_boxes == agree.other_boxes, agree


@pytest.fixture(scope="session")
def tiny_day(s3_endpoint, tiny_weights, tmp_path_factory):
    """A day ingested once, detected once with the tiny model (torch, batch 4): the reference labels.

    The tiny weights live in another bucket (s3://<models bucket>/...) and are fetched through S3.
    """
    models = Store(f"models-{os.getpid()}")
    models.client.create_bucket(Bucket=models.bucket)
    path, sha = tiny_weights
    models.put("yolov5/tiny.pt", path.read_bytes())
    store = Store(f"tiny-day-{os.getpid()}")
    store.client.create_bucket(Bucket=store.bucket)
    tmp = tmp_path_factory.mktemp("tiny-day")
    uri = f"s3://{models.bucket}/yolov5/tiny.pt"
    roads = make_day(store, tmp, uri, sha, batch_size=4, **TINY)
    assert detect_cli(roads) == 0
    return {"store": store, "roads": roads, "weights": uri, "sha": sha, "labels": labels(store),
            "manifest": detect_manifest(store), "tmp": tmp}


def copy_day(src: Store, dst: Store) -> None:
    """The raw archives, ingest images and ingest manifest of a day, into another bucket."""
    for prefix in (LAYOUT.raw_prefix, LAYOUT.work_prefix + "ingest/"):
        for obj in src.list(prefix):
            dst.put(obj.key, src.get(obj.key))


@pytest.fixture
def tiny_copy(tiny_day, store, tmp_path):
    """A fresh bucket holding the tiny day's ingest (nothing detected yet) and its roads file."""
    copy_day(tiny_day["store"], store)
    roads = write_identity_roads(tmp_path / "roads.yaml", store.bucket, cameras=list(CAMERAS),
                             detect={"weights": tiny_day["weights"], "sha256": tiny_day["sha"], "backend": "torch",
                                     "batch_size": 4, **TINY})
    return store, roads


# -- the tiny model: pipeline behaviour ---------------------------------------------------------------

def test_reference_run_labels_every_selected_image(tiny_day):
    m = tiny_day["manifest"]
    ingest = tiny_day["store"].get_json(LAYOUT.ingest_manifest)
    selected = sorted(i["name"] for i in ingest["images"] if i["selected"])
    assert len(selected) == 2 * N_SETS
    assert sorted(m["images"]) == selected and m["failed"] == []
    assert m["counts"]["images"] == len(selected) == m["counts"]["labelled"] + m["counts"]["empty"]
    assert m["counts"]["labelled"] >= len(selected) // 2, "the tiny model must produce boxes on most photos"
    assert m["counts"]["boxes"] == sum(len(t.splitlines()) for t in tiny_day["labels"].values())
    assert m["model"]["sha256"] == tiny_day["sha"] and m["model"]["backend"] == "torch"
    for name, entry in m["images"].items():
        if entry["label"]:
            text = tiny_day["labels"][name[: -len(".jpg")]]
            assert entry["label"] == f"{LAYOUT.detect_labels}{name[:-4]}.txt"
            assert m["outputs"][entry["label"]] == hashlib.sha256(text.encode()).hexdigest()
            assert entry["boxes"] == len(text.splitlines()) == sum(entry["per_class"].values())
            assert len(set(text.splitlines())) == entry["boxes"], "no duplicate lines"
            for line in text.splitlines():
                cls, *xywh = line.split()
                assert 0 <= int(cls) < 80 and all(0 <= float(v) <= 1 for v in xywh)
        else:
            assert entry["boxes"] == 0 and name[:-4] not in tiny_day["labels"]


def test_rerun_skips_and_force_rewrites_identical_labels_and_removes_stale(tiny_copy, capsys):
    store, roads = tiny_copy
    assert detect_cli(roads) == 0
    first, first_manifest = labels(store), detect_manifest(store)
    capsys.readouterr()
    assert detect_cli(roads) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True
    assert labels(store) == first
    # Stale files: a label for an image that now has no boxes, and one for an image that is not in the day.
    # (the tiny model leaves some shared road photos without boxes; on yolov5's bundled photos it may box all)
    empty = next((n for n, e in first_manifest["images"].items() if not e["label"]), None)
    if empty:
        store.put(f"{LAYOUT.detect_labels}{empty[:-4]}.txt", b"0 0.5 0.5 0.1 0.1\n")
    store.put(f"{LAYOUT.detect_labels}{ROAD}_{DAY:%Y%m%d}_235959_side1.txt", b"0 0.5 0.5 0.1 0.1\n")
    assert detect_cli(roads, "--force") == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is False
    assert labels(store) == first, "forced re-run: byte-identical labels, stale ones removed"
    assert detect_manifest(store)["outputs"] == first_manifest["outputs"]


def test_shards_union_to_the_unsharded_output(tiny_day, tiny_copy):
    store, roads = tiny_copy
    rd = road_day(store, roads)
    from answersheet.detect import detect_day

    results = [detect_day(rd, shard_index=i, shard_count=3) for i in range(3)]
    assert [r["counts"]["images"] for r in results] == [8, 7, 7]
    manifests = [detect_manifest(store, i, 3) for i in range(3)]
    union: dict = {}
    for i, m in enumerate(manifests):
        assert (m["shard"], m["shards"]) == (i, 3)
        assert not set(union) & set(m["images"])
        union.update(m["images"])
    ref = tiny_day["manifest"]
    assert union == ref["images"]
    labels_of = lambda outputs: {k for k in outputs if k.startswith(LAYOUT.detect_labels)}  # noqa: E731
    assert labels_of(k for m in manifests for k in m["outputs"]) == labels_of(ref["outputs"])
    assert [m["model"]["predictions"] for m in manifests] == [LAYOUT.detect_predictions(i, 3) for i in range(3)]
    assert_agree(tiny_day["labels"], labels(store))
    ingest = store.get_json(LAYOUT.ingest_manifest)
    names = sorted(i["name"] for i in ingest["images"] if i["selected"])
    assert sorted(manifests[1]["images"]) == names[1::3]


def test_corrupt_and_changed_images_mid_batch_are_reported_and_skipped(tiny_day, tiny_copy):
    store, roads = tiny_copy
    ingest = store.get_json(LAYOUT.ingest_manifest)
    selected = [i for i in ingest["images"] if i["selected"]]
    truncated, changed = selected[5], selected[9]
    # An image cut short (the ingest manifest agrees with the bytes, as if ingest had let it through) ...
    data = store.get(truncated["key"])
    cut = data[: len(data) // 2]
    store.put(truncated["key"], cut)
    truncated["sha256"] = hashlib.sha256(cut).hexdigest()
    store.put_json(LAYOUT.ingest_manifest, ingest)
    # ... and one overwritten after ingest.
    store.put(changed["key"], b"\xff\xd8\xff not a jpeg any more")
    assert detect_cli(roads, "--batch-size", "8") == 0
    m = detect_manifest(store)
    failed = {f["name"]: f["reason"] for f in m["failed"]}
    assert set(failed) == {truncated["name"], changed["name"]}
    assert "truncated JPEG" in failed[truncated["name"]]
    assert "content changed since ingest" in failed[changed["name"]]
    assert m["counts"]["failed"] == 2 and m["counts"]["images"] == 2 * N_SETS
    assert truncated["name"] not in m["images"] and changed["name"] not in m["images"]
    ref = {k: v for k, v in tiny_day["labels"].items() if k + ".jpg" not in failed}
    assert_agree(ref, labels(store))  # the other images of the batch keep their labels


def add_images(store: Store, images: dict[str, bytes], camera: str = "side1") -> list[dict]:
    """Put images into the day's ingest output and its manifest (selected), as if ingest had let them through:
    detect must survive whatever any ingest version accepts. Named between the day's 7-second sets."""
    from answersheet.naming import ImageName

    ingest = store.get_json(LAYOUT.ingest_manifest)
    seconds = [s for s in range(60) if s % 7]  # the day's sets are 7 s apart from 09:00:00
    added = []
    for i, data in enumerate(images.values()):
        parsed = ImageName(ROAD, f"{DAY:%Y%m%d}", f"0900{seconds[i]:02d}", camera)
        name = parsed.filename
        entry = {"name": name, "key": LAYOUT.ingest_images + name, "sha256": hashlib.sha256(data).hexdigest(),
                 "size": len(data), "set_id": parsed.set_id, "camera": camera,
                 "capture_time": parsed.capture_time, "selected": True, "archive": f"{camera}.zip"}
        store.put(entry["key"], data, "image/jpeg")
        ingest["images"].append(entry)
        added.append(entry)
    store.put_json(LAYOUT.ingest_manifest, ingest)
    return added


def test_item4_odd_images_fail_alone_and_the_day_goes_on(tiny_day, tiny_copy, photos, capsys):
    """Extreme shapes, CMYK/grey/progressive/EXIF-rotated and 12/16-bit or gigapixel header claims, mixed
    into the day's batches: each gets labels (or none) or a one-line `failed` entry, and every other image
    keeps its labels. Before: the 60000x8 image ended the stage with an OpenCV assertion traceback."""
    from jpegs import ODD_REFUSED, odd_jpegs

    store, roads = tiny_copy
    odd = odd_jpegs(BUS if BUS.is_file() else photos[0])
    added = dict(zip(odd, add_images(store, odd), strict=True))
    assert detect_cli(roads, "--batch-size", "4") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    m = detect_manifest(store)
    failed = {f["name"]: f["reason"] for f in m["failed"]}
    for kind, entry in added.items():
        name = entry["name"]
        if kind in ODD_REFUSED:
            assert ODD_REFUSED[kind] in failed[name] and "\n" not in failed[name], (kind, failed.get(name))
            assert name not in m["images"]
        else:
            assert name in m["images"] and name not in failed, (kind, failed.get(name))
    assert len(failed) == len(ODD_REFUSED) == m["counts"]["failed"]
    assert m["counts"]["images"] == 2 * N_SETS + len(odd)
    ours = labels(store)
    assert_agree(tiny_day["labels"], {k: v for k, v in ours.items() if k + ".jpg" not in
                                      {e["name"] for e in added.values()}})


def selected_names(store: Store) -> list[str]:
    return sorted(i["name"] for i in store.get_json(LAYOUT.ingest_manifest)["images"] if i["selected"])


def test_item5_truncated_corrupt_and_reset_image_reads_are_retried_and_counted(tiny_day, tiny_copy, fault_proxy,
                                                                                monkeypatch):
    """Image GETs through the fault proxy: a body cut off mid-way, one with flipped bytes (twice) and a reset
    connection. Before: the truncated body ended the stage. Now every image is labelled as in the reference
    run, and the retries are in the manifest."""
    store, roads = tiny_copy
    names = selected_names(store)
    fault_proxy.add("truncate", path_contains=names[3])
    fault_proxy.add("corrupt", path_contains=names[7], times=2)
    fault_proxy.add("reset", path_contains=names[11])  # before any response: botocore's own retry
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    assert detect_cli(roads) == 0
    m = detect_manifest(store)
    assert m["failed"] == []
    assert m["retries"] == {names[3]: 1, names[7]: 2} and m["counts"]["retries"] == 3
    assert m["images"] == tiny_day["manifest"]["images"]
    assert_agree(tiny_day["labels"], labels(store))
    gets = [path for method, path in fault_proxy.requests if method == "GET" and names[7] in path]
    assert len(gets) == 3


def test_item5_a_read_that_keeps_failing_is_a_retryable_failure_and_the_next_run_redoes_it(
        tiny_day, tiny_copy, fault_proxy, monkeypatch):
    from answersheet.detect import GET_ATTEMPTS

    store, roads = tiny_copy
    name = selected_names(store)[5]
    fault_proxy.add("truncate", path_contains=name, times=GET_ATTEMPTS)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    assert detect_cli(roads) == 0
    m = detect_manifest(store)
    [failure] = m["failed"]
    assert failure["name"] == name and failure["retryable"] is True
    assert failure["reason"] == f"read failed in transit (ResponseStreamingError) (after {GET_ATTEMPTS} reads)"
    assert m["retries"] == {name: GET_ATTEMPTS - 1} and len(m["images"]) == 2 * N_SETS - 1
    # The day went on; a later run (no --force, the network healthy again) redoes the shard instead of skipping.
    assert detect_cli(roads) == 0
    m = detect_manifest(store)
    assert m["failed"] == [] and m["retries"] == {} and m["images"] == tiny_day["manifest"]["images"]
    assert_agree(tiny_day["labels"], labels(store))


def test_out_of_memory_halves_the_batch_and_keeps_the_labels(tiny_day, tiny_copy, monkeypatch, caplog):
    store, roads = tiny_copy
    monkeypatch.setenv("ANSWERSHEET_DETECT_OOM_ABOVE", "1")
    assert detect_cli(roads, "--batch-size", "4") == 0
    assert "retrying with batches of 2" in caplog.text and "retrying with batches of 1" in caplog.text
    m = detect_manifest(store)
    assert m["model"]["batch_size"] == 1
    assert_agree(tiny_day["labels"], labels(store))  # batch-1 labels equal batched labels
    assert m["images"] == tiny_day["manifest"]["images"]


def test_out_of_memory_for_one_image_is_a_clear_error(tiny_copy, monkeypatch, capsys):
    store, roads = tiny_copy
    monkeypatch.setenv("ANSWERSHEET_DETECT_OOM_ABOVE", "0")
    assert detect_cli(roads) == 1
    assert "out of memory even for a single image" in capsys.readouterr().err
    assert detect_manifest(store) is None


def test_onnx_export_round_trip_agrees_with_torch(tiny_day, tiny_copy, capsys):
    store, roads = tiny_copy
    weights = tiny_day["weights"]
    assert main(["export-onnx", "--weights", weights, "--sha256", tiny_day["sha"]]) == 0
    out = json.loads(capsys.readouterr().out)
    onnx_uri = weights[: -len(".pt")] + ".onnx"
    assert out["onnx"] == onnx_uri
    bucket, key = onnx_uri[5:].split("/", 1)
    models = Store(bucket)
    digest = hashlib.sha256(models.get(key)).hexdigest()
    assert out["onnx_sha256"] == digest
    assert models.get(key + ".sha256").decode() == f"{digest}  tiny.onnx\n"
    roads = write_identity_roads(roads, store.bucket, cameras=list(CAMERAS),
                             detect={"weights": weights, "sha256": tiny_day["sha"], "onnx": onnx_uri,
                                     "onnx_sha256": digest, "backend": "onnx", "batch_size": 4, **TINY})
    assert detect_cli(roads) == 0
    m = detect_manifest(store)
    assert (m["model"]["backend"], m["model"]["onnx_sha256"]) == ("onnx", digest)
    assert_agree(tiny_day["labels"], labels(store))
    # A wrong ONNX digest is refused like wrong weights.
    bad = write_identity_roads(roads, store.bucket, cameras=list(CAMERAS),
                           detect={"weights": weights, "sha256": tiny_day["sha"], "onnx": onnx_uri,
                                   "onnx_sha256": "0" * 64, "backend": "onnx", **TINY})
    assert detect_cli(bad, "--force") == 1
    err = capsys.readouterr().err
    assert f"{onnx_uri}: sha256 mismatch" in err and digest in err and "0" * 64 in err


def test_export_onnx_to_a_local_file_writes_the_sha256_beside_it(tiny_weights, tmp_path, capsys):
    path, sha = tiny_weights
    out = tmp_path / "models" / "tiny.onnx"
    assert main(["export-onnx", "--weights", str(path), "--out", str(out), "--sha256", sha]) == 0
    result = json.loads(capsys.readouterr().out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert result["onnx_sha256"] == digest and result["weights_sha256"] == sha
    assert (tmp_path / "models" / "tiny.onnx.sha256").read_text() == f"{digest}  tiny.onnx\n"
    from answersheet.detector.onnx_backend import OnnxBackend

    backend = OnnxBackend(out, "cpu")
    assert (backend.stride, len(backend.names), backend.names[0]) == (32, 80, "person")
    # Wrong weights digest: refused before anything is written.
    assert main(["export-onnx", "--weights", str(path), "--out", str(tmp_path / "x.onnx"), "--sha256", "b" * 64]) == 1
    assert f"{path}: sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


# -- item 7: the model identity ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_onnx(tiny_weights, tmp_path_factory) -> tuple[Path, str]:
    """(path, sha256) of the tiny weights exported by `export-onnx` to a local file (traced at the tiny
    roads' imgsz, so it is also byte for byte what the ONNX cache holds for them)."""
    from answersheet.detector.onnx_export import export_onnx

    path, sha = tiny_weights
    out = tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx"
    result = export_onnx(str(path), out=str(out), imgsz=TINY["imgsz"], sha256=sha)
    return out, result["onnx_sha256"]


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory) -> tuple[Path, str]:
    """Other tiny weights (seed 1): a valid checkpoint that the tiny ONNX was not exported from."""
    from answersheet.dev.random_init import save_random_checkpoint

    path = tmp_path_factory.mktemp("other-weights") / "other.pt"
    return path, save_random_checkpoint(path, cfg="yolov5n.yaml", nc=80, width_multiple=0.125, seed=1)


def onnx_roads(path: Path, store: Store, weights: str, sha: str, onnx: Path, onnx_sha: str) -> Path:
    return write_identity_roads(path, store.bucket, cameras=list(CAMERAS),
                            detect={"weights": weights, "sha256": sha, "onnx": str(onnx), "onnx_sha256": onnx_sha,
                                    "backend": "onnx", "batch_size": 4, **TINY})


def test_onnx_backend_opens_and_runs_without_importing_torch(tiny_weights, tiny_onnx, tmp_path):
    """The CPU path — open_backend, ONNX Runtime, the numpy pre/post-processing, the stage module — never
    imports torch or yolov5 (torch alone: ≈0.9 GB RSS and seconds of start-up), in a fresh interpreter.
    (`auto` on a CPU with native bf16 is OpenVINO: tests/test_openvino_backend.py checks that path too.)"""
    (weights, sha), (onnx_path, onnx_sha) = tiny_weights, tiny_onnx
    roads = write_identity_roads(tmp_path / "roads.yaml", "answersheet", cameras=list(CAMERAS),
                                 detect={"weights": str(weights), "sha256": sha, "onnx": str(onnx_path),
                                         "onnx_sha256": onnx_sha, **TINY})
    code = f"""if True:
        import json, sys
        import answersheet.detect
        from answersheet.config import load_road
        from answersheet.detector import Backend, open_backend
        from answersheet.detector.postprocess import candidates, nms
        from answersheet.detector.preprocess import prepare
        road = load_road({str(roads)!r}, {ROAD!r})
        backend, lineage = open_backend(road.detect, "onnx", "cpu", {str(tmp_path)!r})
        p = prepare("bus.jpg", open({str(BUS)!r}, "rb").read(), 320, backend.stride)
        rows = candidates(backend.infer(p.chw[None]), 0.25)[0]
        print(json.dumps({{"backend": isinstance(backend, Backend), "lineage": lineage,
                          "boxes": len(nms(rows, 0.25, 0.45, 100)),
                          "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "yolov5"))}}))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == [] and out["backend"] and out["boxes"] > 0
    assert {k: out["lineage"][k] for k in ("backend", "sha256", "onnx", "onnx_sha256", "device", "providers")} == {
        "backend": "onnx", "sha256": sha, "onnx": str(onnx_path), "onnx_sha256": onnx_sha, "device": "cpu",
        "providers": ["CPUExecutionProvider"]}


def test_every_backend_is_a_backend(tiny_weights, tiny_onnx):
    from answersheet.detector import LOADERS, Backend
    from answersheet.detector.checkpoint import load_checkpoint
    from answersheet.detector.onnx_backend import OnnxBackend
    from answersheet.detector.torch_backend import TorchBackend

    for backend in (TorchBackend(load_checkpoint(tiny_weights[0]), "cpu"), OnnxBackend(tiny_onnx[0], "cpu")):
        assert isinstance(backend, Backend) and backend.name in LOADERS
        assert (backend.stride, backend.nc, backend.device, backend.streams) == (32, 80, "cpu", 1)


def test_backend_and_device_resolve_or_fail_in_one_line(monkeypatch):
    from answersheet.detector import LOADERS, resolve_backend
    from answersheet.detector.loaders import cpu_default

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # no GPU visible, also on a machine that has one
    assert resolve_backend("auto", "auto") == (cpu_default(), "cpu")  # openvino or onnx: test_openvino_backend
    assert resolve_backend("torch", "auto") == ("torch", "cpu")
    for backend, device, message in [
        ("tflite", "cpu", f"--backend 'tflite': must be one of auto, {', '.join(LOADERS)}"),
        ("onnx", "cuda:1",
         "--device cuda:1: no usable CUDA device here for the onnx backend; use --device cpu or auto"),
    ]:
        with pytest.raises(AnswersheetError) as caught:
            resolve_backend(backend, device)
        assert str(caught.value) == message


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("answersheet: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_item7_export_onnx_writes_the_weights_digest_into_the_onnx(tiny_onnx, tiny_weights):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx[0])).metadata_props}
    assert meta["source_sha256"] == tiny_weights[1] and meta["producer"] == "answersheet export-onnx"


def test_item7_onnx_of_other_weights_is_refused_in_one_line_and_nothing_is_written(
        tiny_copy, tiny_onnx, tiny_weights, other_weights, tmp_path, capsys):
    """detect.onnx (its own sha256 right) exported from the tiny weights, but detect.weights/sha256 name other,
    valid weights: before, the run committed labels under the other weights' digest."""
    store, _ = tiny_copy
    onnx_path, onnx_sha = tiny_onnx
    roads = onnx_roads(tmp_path / "roads.yaml", store, str(other_weights[0]), other_weights[1], onnx_path, onnx_sha)
    assert detect_cli(roads) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"answersheet: error: {onnx_path}: exported from weights with sha256 {tiny_weights[1]}, but "
                    f"detect.sha256 is {other_weights[1]} (a stale detect.sha256, or an ONNX file of other weights)")
    assert nothing_written(store)


def test_item7_wrong_detect_sha256_with_onnx_is_refused_and_nothing_is_written(tiny_copy, tiny_onnx, tmp_path,
                                                                                  capsys, tiny_weights):
    store, _ = tiny_copy
    roads = onnx_roads(tmp_path / "roads.yaml", store, str(tiny_weights[0]), "a" * 64, *tiny_onnx)
    assert detect_cli(roads) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{tiny_weights[0]}: sha256 mismatch" in line and "a" * 64 in line and tiny_weights[1] in line
    assert nothing_written(store)


def test_item7_missing_weights_with_onnx_is_refused(tiny_copy, tiny_onnx, tiny_weights, tmp_path, capsys):
    store, _ = tiny_copy
    missing = f"s3://{store.bucket}/models/missing.pt"
    roads = onnx_roads(tmp_path / "roads.yaml", store, missing, tiny_weights[1], *tiny_onnx)
    assert detect_cli(roads) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f"answersheet: error: {missing}: ")
    assert nothing_written(store)


def test_item7_onnx_without_a_weights_digest_is_refused(tiny_copy, tiny_onnx, tiny_weights, tmp_path, capsys):
    """An ONNX file made elsewhere (yolov5's own export.py) says nothing about its weights: refused, with the
    command that makes one that does."""
    import onnx

    store, _ = tiny_copy
    proto = onnx.load(str(tiny_onnx[0]))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "source_sha256"]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    roads = onnx_roads(tmp_path / "roads.yaml", store, str(tiny_weights[0]), tiny_weights[1], bare,
                       hashlib.sha256(bare.read_bytes()).hexdigest())
    assert detect_cli(roads) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{bare}: no source_sha256 in its metadata" in line and "answersheet export-onnx" in line
    assert nothing_written(store)


def test_item7_manifest_lineage_with_onnx_names_both_verified_digests(tiny_day, tiny_copy, tiny_onnx, tmp_path):
    store, _ = tiny_copy
    roads = onnx_roads(tmp_path / "roads.yaml", store, tiny_day["weights"], tiny_day["sha"], *tiny_onnx)
    assert detect_cli(roads) == 0
    model = detect_manifest(store)["model"]
    assert (model["weights"], model["sha256"]) == (tiny_day["weights"], tiny_day["sha"])
    assert (model["onnx"], model["onnx_sha256"]) == (str(tiny_onnx[0]), tiny_onnx[1])
    assert_agree(tiny_day["labels"], labels(store))


# -- section 4: the shipped default on CPU (backend auto, no detect.onnx) -------------------------------

def cache_objects(store: Store) -> dict[str, bytes]:
    from answersheet.layout import ONNX_CACHE_PREFIX

    return {o.key: store.get(o.key) for o in store.list(ONNX_CACHE_PREFIX)}


def auto_roads(path: Path, store: Store, tiny_day: dict) -> Path:
    """The shipped roads file with the tiny weights and no detect.onnx, on ONNX Runtime: the ONNX cache
    mechanics with labels that must equal torch's. (`auto` on a CPU with native bf16 runs the same cache
    entry with OpenVINO bf16, whose labels are close, not equal: tests/test_openvino_backend.py.)"""
    return write_identity_roads(path, store.bucket, cameras=list(CAMERAS),
                            detect={"weights": tiny_day["weights"], "sha256": tiny_day["sha"], "batch_size": 4,
                                    "backend": "onnx", **TINY})


def test_fast_default_exports_once_into_the_bucket_cache_then_reads_it(tiny_day, tiny_copy, tmp_path):
    from answersheet.detector.onnx_export import OPSET, export_settings_hash
    from answersheet.layout import onnx_cache_key

    store, _ = tiny_copy
    roads = auto_roads(tmp_path / "roads.yaml", store, tiny_day)
    key = onnx_cache_key(tiny_day["sha"], OPSET, export_settings_hash(TINY["imgsz"]))
    assert detect_cli(roads) == 0
    cold = detect_manifest(store)
    first = labels(store)
    assert (cold["model"]["backend"], cold["model"]["device"]) == ("onnx", "cpu")
    assert cold["model"]["onnx_cache"] == "miss: exported and cached"
    assert cold["model"]["onnx"] == store.uri(key)
    cached = cache_objects(store)
    assert set(cached) == {key, key + ".sha256"}
    digest = hashlib.sha256(cached[key]).hexdigest()
    assert cold["model"]["onnx_sha256"] == digest and cold["model"]["sha256"] == tiny_day["sha"]
    assert cached[key + ".sha256"].decode() == f"{digest}  {key.rsplit('/', 1)[1]}\n"
    head = store.client.head_object(Bucket=store.bucket, Key=key)["Metadata"]
    assert head == {"sha256": digest, "source-sha256": tiny_day["sha"]}
    assert_agree(tiny_day["labels"], first)
    # Warm: the entry is read (and verified), nothing exported; byte-identical labels.
    assert detect_cli(roads, "--force") == 0
    warm = detect_manifest(store)
    assert warm["model"]["onnx_cache"] == "hit" and warm["model"]["onnx_sha256"] == digest
    assert labels(store) == first and cache_objects(store) == cached


def test_fast_default_corrupt_cache_entry_is_detected_and_replaced(tiny_day, tiny_copy, tiny_onnx, tmp_path, caplog):
    """A cache entry with one bit-rotted byte (its recorded digest unchanged) is refused on read, exported
    again and replaced — with the bytes `export-onnx` makes for the same weights and settings (deterministic)."""
    from answersheet.detector.onnx_export import OPSET, export_settings_hash
    from answersheet.layout import onnx_cache_key

    store, _ = tiny_copy
    roads = auto_roads(tmp_path / "roads.yaml", store, tiny_day)
    key = onnx_cache_key(tiny_day["sha"], OPSET, export_settings_hash(TINY["imgsz"]))
    good = tiny_onnx[0].read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    meta = {"sha256": tiny_onnx[1], "source-sha256": tiny_day["sha"]}
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(flipped), Metadata=meta)
    assert detect_cli(roads) == 0
    assert (f"ONNX cache entry {store.uri(key)} is bad (corrupt: its bytes have sha256 "
            f"{hashlib.sha256(flipped).hexdigest()}, its metadata says {tiny_onnx[1]})") in caplog.text
    m = detect_manifest(store)
    assert m["model"]["onnx_cache"] == "miss: exported and cached" and m["model"]["onnx_sha256"] == tiny_onnx[1]
    assert cache_objects(store)[key] == good
    assert_agree(tiny_day["labels"], labels(store))


def test_fast_default_two_shards_racing_share_one_cache_entry(tiny_day, tiny_copy, tmp_path):
    """Two shard processes start together on a cold cache (as two pods would): one entry, both shards use
    its bytes, and the union of their labels is the day's."""
    store, _ = tiny_copy
    roads = auto_roads(tmp_path / "roads.yaml", store, tiny_day)
    cmd = [str(VENV_BIN / "answersheet"), "detect", "--road", ROAD, "--date", DAY.isoformat(), "--config",
           str(roads), "--shard-count", "2", "--shard-index"]
    procs = [subprocess.Popen([*cmd, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    models = [detect_manifest(store, i, 2)["model"] for i in range(2)]
    cached = cache_objects(store)
    key = next(k for k in cached if k.endswith(".onnx"))
    assert len(cached) == 2 and models[0]["onnx"] == models[1]["onnx"] == store.uri(key)
    assert models[0]["onnx_sha256"] == models[1]["onnx_sha256"] == hashlib.sha256(cached[key]).hexdigest()
    assert {m["onnx_cache"] for m in models} <= {"hit", "miss: exported and cached",
                                                 "miss: exported, cached by another run first"}
    assert_agree(tiny_day["labels"], labels(store))


def test_fast_default_a_second_writer_gets_the_first_writers_entry(tiny_day, store, tmp_path):
    """The race, deterministically: the entry appears between this run's miss and its write (another shard
    won). The conditional PUT is refused and this run uses — and verifies — the bytes the bucket holds."""
    from answersheet.detector.onnx_export import OPSET, _publish, export_settings_hash
    from answersheet.layout import onnx_cache_key

    key = onnx_cache_key(tiny_day["sha"], OPSET, export_settings_hash(320))
    theirs, ours = b"their export", tmp_path / "ours.onnx"
    ours.write_bytes(b"our export")
    store.client.put_object(Bucket=store.bucket, Key=key, Body=theirs,
                            Metadata={"sha256": hashlib.sha256(theirs).hexdigest(), "source-sha256": tiny_day["sha"]})
    got = _publish(store, key, ours, hashlib.sha256(b"our export").hexdigest(), tiny_day["sha"],
                   tmp_path / "used.onnx", replace=False)
    assert got.cache == "miss: exported, cached by another run first"
    assert got.sha256 == hashlib.sha256(theirs).hexdigest() and got.path.read_bytes() == theirs
    assert store.get(key) == theirs


# -- bad models: clear errors, nothing written -------------------------------------------------------

def nothing_written(store: Store) -> bool:
    return not store.list(LAYOUT.work_prefix + "detect/")


def test_weights_sha_mismatch_is_a_clear_error_and_writes_nothing(tiny_day, tiny_copy, capsys):
    store, _ = tiny_copy
    roads = write_identity_roads(tiny_day["tmp"] / "bad-sha.yaml", store.bucket, cameras=list(CAMERAS),
                             detect={"weights": tiny_day["weights"], "sha256": "a" * 64, "backend": "torch"})
    assert detect_cli(roads) == 1
    err = capsys.readouterr().err
    assert f"answersheet: error: {tiny_day['weights']}: sha256 mismatch" in err
    assert tiny_day["sha"] in err and "a" * 64 in err
    assert nothing_written(store)


def test_corrupt_weights_file_is_a_clear_error(tiny_copy, tmp_path, capsys, tiny_weights):
    store, _ = tiny_copy
    for name, data in (("garbage.pt", b"not a checkpoint" * 100),
                       ("truncated.pt", tiny_weights[0].read_bytes()[:50_000])):
        path = tmp_path / name
        path.write_bytes(data)
        roads = write_identity_roads(tmp_path / "roads.yaml", store.bucket, cameras=list(CAMERAS),
                                 detect={"weights": str(path), "sha256": hashlib.sha256(data).hexdigest(),
                                         "backend": "torch"})
        assert detect_cli(roads) == 1
        err = capsys.readouterr().err
        assert f"answersheet: error: {path}: " in err
        assert "checkpoint" in err
        assert nothing_written(store)


def test_class_count_mismatch_is_a_clear_error(tiny_day, tiny_copy, capsys):
    store, _ = tiny_copy
    roads = write_identity_roads(tiny_day["tmp"] / "classes.yaml", store.bucket, cameras=list(CAMERAS),
                             classes=["car", "truck", "bus"],
                             detect={"weights": tiny_day["weights"], "sha256": tiny_day["sha"], "backend": "torch"})
    assert detect_cli(roads) == 1
    assert "the model has 80 classes but road 'daewang_pangyo' lists 3" in capsys.readouterr().err
    assert nothing_written(store)


def test_missing_ingest_manifest_names_the_stage(store, tmp_path, tiny_weights):
    path, sha = tiny_weights
    roads = write_identity_roads(tmp_path / "roads.yaml", store.bucket, detect={"weights": str(path), "sha256": sha})
    with pytest.raises(AnswersheetError, match="ingest/manifest.json: missing — run the ingest stage"):
        from answersheet.detect import detect_day

        detect_day(road_day(store, roads))


def test_bad_shard_arguments(tiny_copy, capsys):
    _, roads = tiny_copy
    assert detect_cli(roads, "--shard-index", "3", "--shard-count", "3") == 1
    assert "need 0 <= shard index < shard count" in capsys.readouterr().err


# -- real COCO weights: equal to `yolov5 detect` -------------------------------------------------------

@pytest.fixture(scope="session")
def real_day(s3_endpoint, tmp_path_factory):
    """A day detected with the real weights (torch via the CLI), and `yolov5 detect` on the same images."""
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"real YOLOv5 weights not found at {REAL_WEIGHTS} (set ANSWERSHEET_WEIGHTS)")
    sha = hashlib.sha256(REAL_WEIGHTS.read_bytes()).hexdigest()
    store = Store(f"real-day-{os.getpid()}")
    store.client.create_bucket(Bucket=store.bucket)
    store.put("models/yolov5n.pt", REAL_WEIGHTS.read_bytes())
    tmp = tmp_path_factory.mktemp("real-day")
    roads = make_day(store, tmp, f"s3://{store.bucket}/models/yolov5n.pt", sha)
    assert detect_cli(roads) == 0
    ours, manifest = labels(store), detect_manifest(store)
    # The seed's way: `yolov5 detect` on the ingested images, same thresholds and size.
    src = tmp / "images"
    src.mkdir()
    for img in store.get_json(LAYOUT.ingest_manifest)["images"]:
        (src / img["name"]).write_bytes(store.get(img["key"]))
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    subprocess.run(
        [str(VENV_BIN / "yolov5"), "detect", "--weights", str(REAL_WEIGHTS.resolve()), "--source", str(src),
         "--save-txt", "--nosave", "--conf-thres", "0.25", "--iou-thres", "0.45", "--imgsz", "640",
         "--project", str(tmp / "runs"), "--name", "exp"],
        check=True, env=env, cwd=tmp, capture_output=True,
    )
    cli = {p.stem: p.read_text() for p in (tmp / "runs" / "exp" / "labels").glob("*.txt")}
    return {"store": store, "roads": roads, "ours": ours, "manifest": manifest, "cli": cli, "sha": sha, "tmp": tmp}


def test_real_weights_labels_equal_yolov5_detect(real_day):
    assert real_day["cli"], "yolov5 detect wrote no labels"
    assert real_day["ours"] == real_day["cli"]
    m = real_day["manifest"]
    assert m["model"]["sha256"] == real_day["sha"] and m["counts"]["failed"] == 0


def test_real_weights_find_the_bus_and_its_people(real_day):
    if not BUS.is_file():
        pytest.skip(f"{BUS} not found")
    m = real_day["manifest"]
    bus_names = [n for n, e in m["images"].items() if e["per_class"].get("5")]
    assert bus_names, "a bus must be detected in bus.jpg"
    per_class = m["images"][bus_names[0]]["per_class"]
    assert per_class["5"] >= 1 and per_class.get("0", 0) >= 4, per_class


def test_real_weights_onnx_backend_agrees(real_day, capsys):
    store, roads = real_day["store"], real_day["roads"]
    weights = f"s3://{store.bucket}/models/yolov5n.pt"
    assert main(["export-onnx", "--weights", weights, "--sha256", real_day["sha"]]) == 0
    digest = json.loads(capsys.readouterr().out)["onnx_sha256"]
    roads = write_identity_roads(real_day["tmp"] / "onnx.yaml", store.bucket, cameras=list(CAMERAS),
                             detect={"weights": weights, "sha256": real_day["sha"],
                                     "onnx": f"s3://{store.bucket}/models/yolov5n.onnx", "onnx_sha256": digest,
                                     "backend": "onnx"})
    assert detect_cli(roads) == 0
    assert detect_manifest(store)["model"]["backend"] == "onnx"
    onnx_labels = labels(store)
    assert_agree(real_day["cli"], onnx_labels)
    assert agreement(real_day["cli"], onnx_labels).identical_files >= 0.9 * len(real_day["cli"])
