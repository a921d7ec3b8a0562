"""The OpenVINO backend (answersheet.detector.openvino_backend) against ONNX Runtime fp32 on real road photos, what
`backend: auto` picks on CPU, and the detect stage with it through a real S3 server (manifest, ONNX cache).

OpenVINO runs bf16 where the CPU has it natively (the dev machine: AVX512_BF16), so its labels are close to,
not byte-identical with, ONNX Runtime's (and so the CLI's). Tolerances, measured on the 19 shared road
samples at imgsz 1280 with yolov5n (the example road's size): objectness within 0.05 of fp32, box corners
within 8.3 px; boxes matched one-to-one 95.8 % at IoU > 0.9 and 98.5 % at IoU > 0.5 (261 vs 263 boxes);
the asserts below leave some room for another bf16 CPU. OpenVINO f32 gives the same label files as ONNX
Runtime there (all 19).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DAY, REAL_WEIGHTS, ROAD, ROAD_SAMPLES, real_photos, write_roads_file

from answersheet.cli import main
from answersheet.detector import LOADERS, Backend
from answersheet.detector.onnx_backend import OnnxBackend
from answersheet.detector.openvino_backend import OpenVinoBackend, default_precision, fast_cpu_default
from answersheet.detector.postprocess import candidates, label_text, nms
from answersheet.detector.preprocess import decode_bgr, letterbox_chw
from answersheet.dev.label_agreement import agreement
from answersheet.errors import AnswersheetError
from answersheet.layout import DayLayout

pytest.importorskip("openvino")  # a project dependency (extra `detect`): absent only in a partial install

IMGSZ = 1280
LAYOUT = DayLayout(ROAD, DAY)
COCO80 = yaml.safe_load((Path(__file__).parents[1] / "dags" / "roads.yaml").read_text())["defaults"]["classes"]


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16 in the kernel's CPU flags: what OpenVINO's CPU plugin runs bf16 on."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.fixture(scope="session")
def real_onnx(tmp_path_factory) -> Path:
    """yolov5n exported at 1280 (in a child process, as detect's cache miss does)."""
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"real YOLOv5 weights not found at {REAL_WEIGHTS} (set ANSWERSHEET_WEIGHTS)")
    from answersheet.detector.onnx_export import export_in_subprocess

    out = tmp_path_factory.mktemp("onnx") / "yolov5n-1280.onnx"
    sha = hashlib.sha256(REAL_WEIGHTS.read_bytes()).hexdigest()
    export_in_subprocess(REAL_WEIGHTS, out, IMGSZ, sha)
    return out


def road_photos() -> list[Path]:
    return sorted(ROAD_SAMPLES.glob("*.jpg")) if ROAD_SAMPLES.is_dir() else real_photos()


def labels_and_raw(backend, photos: list[Path]) -> tuple[dict[str, str], list[np.ndarray]]:
    """Per photo: the label text `yolov5 detect` would write from this backend's predictions, and the raw rows."""
    texts, raw = {}, []
    for photo in photos:
        bgr = decode_bgr(photo.read_bytes())
        chw = letterbox_chw(bgr, IMGSZ, backend.stride)
        pred = backend.infer(chw[None])
        raw.append(pred[0])
        det = nms(candidates(pred, 0.25)[0], 0.25, 0.45, 1000)
        texts[photo.stem] = label_text(det, chw.shape[1:], bgr.shape[:2])[0]
    return texts, raw


def test_openvino_agrees_with_onnx_runtime_fp32_on_real_road_photos(real_onnx):
    photos = road_photos()
    ref_labels, ref_raw = labels_and_raw(OnnxBackend(real_onnx, "cpu"), photos)
    ov = OpenVinoBackend(real_onnx, "cpu", streams=2)
    assert isinstance(ov, Backend) and ov.name in LOADERS
    assert (ov.stride, ov.nc, ov.names[2], ov.device, ov.streams) == (32, 80, "car", "cpu", 2)
    assert ov.metadata["source_sha256"] == hashlib.sha256(REAL_WEIGHTS.read_bytes()).hexdigest()
    ov_labels, ov_raw = labels_and_raw(ov, photos)
    for ref, got in zip(ref_raw, ov_raw, strict=True):
        assert got.shape == ref.shape and got.dtype == np.float32
        live = ref[:, 4] > 0.1  # the anchors that can become boxes
        assert np.abs(got[live, 4] - ref[live, 4]).max() <= 0.08
        assert np.abs(got[live, :4] - ref[live, :4]).max() <= 12  # pixels of the 1280 input
    boxes = sum(len(t.splitlines()) for t in ref_labels.values())
    assert boxes > 100, "the road photos must give real boxes to compare"
    tight, loose = agreement(ref_labels, ov_labels, 0.9), agreement(ref_labels, ov_labels, 0.5)
    assert tight.matched_share >= 0.92, tight
    assert loose.matched_share >= 0.97, loose
    assert abs(loose.other_boxes - loose.reference_boxes) <= 0.03 * loose.reference_boxes, loose
    if ov.precision == "bf16":
        assert tight.identical_files < tight.files, "bf16 should move some box (else this test checks nothing)"


def test_openvino_f32_gives_onnx_runtimes_labels(real_onnx):
    """With full precision the two engines agree box for box: bf16 is what moves the labels, nothing else
    on the OpenVINO path (the uint8 -> /255 conversion inside the model, the static per-shape compile)."""
    photos = road_photos()[:8]
    ref, _ = labels_and_raw(OnnxBackend(real_onnx, "cpu"), photos)
    ov = OpenVinoBackend(real_onnx, "cpu", precision="f32")
    assert ov.precision == "f32" and ov.providers[0].endswith("CPU f32")
    got, _ = labels_and_raw(ov, photos)
    agree = agreement(ref, got)
    assert agree.matched == agree.reference_boxes == agree.other_boxes > 0, agree


def test_batches_of_several_sizes_and_shapes_equal_single_images(real_onnx):
    """A batch is run image by image on per-shape compiled models: the same rows as one image at a time,
    for two letterbox shapes in turn (the compiled-model cache keyed by shape)."""
    ov = OpenVinoBackend(real_onnx, "cpu", streams=2)
    rng = np.random.default_rng(0)
    for h, w in ((384, 640), (736, 1280), (384, 640)):
        batch = rng.integers(0, 255, (3, 3, h, w), dtype=np.uint8)
        whole = ov.infer(batch)
        assert whole.shape == (3, 3 * (h // 8) * (w // 8) * 21 // 16, 85)
        for i in range(3):
            np.testing.assert_array_equal(whole[i], ov.infer(batch[i : i + 1])[0])
    assert list(ov._compiled) == [(736, 1280), (384, 640)]


def test_auto_picks_openvino_on_a_cpu_with_native_bf16_else_onnx_runtime(monkeypatch):
    from answersheet.detector import resolve_backend

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # the CPU choice, also on a machine with a GPU
    assert fast_cpu_default() == cpu_has_native_bf16()
    assert default_precision() == ("bf16" if cpu_has_native_bf16() else "f32")
    assert resolve_backend("auto", "auto") == ("openvino" if cpu_has_native_bf16() else "onnx", "cpu")
    assert resolve_backend("openvino", "auto") == ("openvino", "cpu")
    assert resolve_backend("onnx", "cpu") == ("onnx", "cpu")  # explicit choices are kept


def test_openvino_on_cuda_is_one_clear_line():
    from answersheet.detector import resolve_backend

    with pytest.raises(AnswersheetError) as caught:
        resolve_backend("openvino", "cuda:0")
    assert str(caught.value) == ("--device cuda:0: no usable CUDA device here for the openvino backend; "
                                 "use --device cpu or auto")
    with pytest.raises(AnswersheetError, match="runs on the CPU only"):
        OpenVinoBackend(Path("unused.onnx"), "cuda:0")


@pytest.fixture(scope="module")
def tiny_onnx_file(tiny_weights, tmp_path_factory) -> tuple[Path, str]:
    from answersheet.detector.onnx_export import export_in_subprocess

    weights, sha = tiny_weights
    out = tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx"
    return out, export_in_subprocess(weights, out, 320, sha)


def test_first_inferences_on_two_threads_at_once_do_not_deadlock(tiny_onnx_file):
    """Two inference threads making their first `infer` at the same moment, right after the backend opened
    (what detect's two streams do): OpenVINO's lazily initialised numpy glue deadlocked there in 4 of 6
    fresh processes before the backend warmed it up on the opening thread. Fresh interpreters, since the
    glue initialises once per process."""
    code = f"""if True:
        import threading
        import numpy as np
        from answersheet.detector.openvino_backend import OpenVinoBackend
        backend = OpenVinoBackend({str(tiny_onnx_file[0])!r}, "cpu", streams=2)
        barrier = threading.Barrier(2)
        def first_infer():
            barrier.wait()
            backend.infer(np.zeros((1, 3, 64, 96), np.uint8))
        threads = [threading.Thread(target=first_infer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("done")
    """
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stdout.strip()) == (0, "done"), proc.stderr[-2000:]


def test_openvino_path_opens_and_runs_without_importing_torch(tiny_weights, tiny_onnx_file, tmp_path):
    """open_backend with OpenVINO, the numpy pre/post-processing and the stage module never import torch or
    yolov5, in a fresh interpreter; the lineage names the engine and its precision."""
    weights, sha = tiny_weights
    onnx_path, onnx_sha = tiny_onnx_file
    roads = write_roads_file(tmp_path / "roads.yaml", "answersheet", classes=COCO80,
                             detect={"weights": str(weights), "sha256": sha, "onnx": str(onnx_path),
                                     "onnx_sha256": onnx_sha, "class_map": "identity", "class_conf_thres": None,
                                     "slices": None, "agnostic_nms": None, "imgsz": 320})
    photo = road_photos()[0]
    code = f"""if True:
        import json, sys
        import answersheet.detect
        from answersheet.config import load_road
        from answersheet.detector import open_backend
        from answersheet.detector.postprocess import candidates
        from answersheet.detector.preprocess import prepare
        road = load_road({str(roads)!r}, {ROAD!r})
        backend, lineage = open_backend(road.detect, "openvino", "cpu", {str(tmp_path)!r})
        p = prepare("x.jpg", open({str(photo)!r}, "rb").read(), 320, backend.stride)
        rows = candidates(backend.infer(p.chw[None]), 0.001)[0]
        print(json.dumps({{"lineage": lineage, "rows": len(rows),
                          "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "yolov5"))}}))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == [] and out["rows"] > 0
    lineage = out["lineage"]
    assert (lineage["backend"], lineage["device"], lineage["precision"]) == ("openvino", "cpu", default_precision())
    assert (lineage["onnx"], lineage["onnx_sha256"]) == (str(onnx_path), onnx_sha)


def test_not_an_onnx_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(AnswersheetError, match=r"bad\.onnx: not a loadable ONNX model") as info:
        OpenVinoBackend(bad, "cpu")
    assert "\n" not in str(info.value)


# -- the detect stage with it: shipped default (auto, no detect.onnx) through a real S3 server ---------

def test_shipped_default_detect_runs_openvino_from_the_onnx_cache_and_records_precision(
        store, tiny_weights, photos, tmp_path, capsys):
    """The shipped roads file (backend auto, no detect.onnx) on this CPU: detect reads the bucket's ONNX
    cache entry, runs it with OpenVINO where the CPU has bf16 (else ONNX Runtime), and the manifest says
    which engine and precision made the labels. Switching to `--backend onnx` redoes the stage (its
    inputs digest names the engine), and then the labels come from ONNX Runtime fp32."""
    from answersheet.config import load_road
    from answersheet.day import RoadDay
    from answersheet.dev.sample_day import build_day_archives, upload_day
    from answersheet.ingest import ingest_day

    path, sha = tiny_weights
    store.put("models/tiny.pt", path.read_bytes())
    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket, cameras=["side1", "side2"], classes=COCO80,
                             detect={"weights": f"s3://{store.bucket}/models/tiny.pt", "sha256": sha,
                                     "class_map": "identity", "class_conf_thres": None, "slices": None,
                                     "agnostic_nms": None, "imgsz": 320, "max_det": 100})
    upload_day(store, ROAD, DAY, build_day_archives(ROAD, DAY, ("side1", "side2"), 4, photos))
    ingest_day(RoadDay(road=load_road(roads, ROAD), day=DAY, store=store))
    cli = ["detect", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads)]

    assert main(cli) == 0
    model = store.get_json(LAYOUT.detect_manifest(0, 1))["model"]
    expected = "openvino" if cpu_has_native_bf16() else "onnx"
    assert (model["backend"], model["device"]) == (expected, "cpu")
    assert model["precision"] == ("bf16" if expected == "openvino" else "f32")
    if expected == "openvino":
        assert model["providers"] == [f"OpenVINO {_ov_version()} CPU bf16"] and model["streams"] >= 1
    assert model["onnx_cache"] == "miss: exported and cached" and model["sha256"] == sha
    cached = store.get(model["onnx"].split("/", 3)[3])
    assert model["onnx_sha256"] == hashlib.sha256(cached).hexdigest()
    assert main(cli) == 0 and '"skipped": true' in capsys.readouterr().out  # same engine: skips

    assert main([*cli, "--backend", "onnx"]) == 0
    assert '"skipped": false' in capsys.readouterr().out  # another engine: redone
    model = store.get_json(LAYOUT.detect_manifest(0, 1))["model"]
    assert (model["backend"], model["precision"], model["onnx_cache"]) == ("onnx", "f32", "hit")


def _ov_version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]


def test_cli_accepts_backend_openvino(store, tmp_path, capsys):
    """`--backend openvino` is a choice of the CLI and of detect.backend in the roads file."""
    from answersheet.config import load_road

    roads = write_roads_file(tmp_path / "roads.yaml", store.bucket, detect={"backend": "openvino"})
    assert load_road(roads, ROAD).detect.backend == "openvino"
    assert os.environ.get("AWS_ENDPOINT_URL")  # the real S3 server of the session
    code = main(["detect", "--road", ROAD, "--date", DAY.isoformat(), "--config", str(roads),
                 "--backend", "openvino"])
    err = capsys.readouterr().err
    assert code == 1 and "ingest" in err and "invalid choice" not in err  # no ingest yet: a clear stage error
