"""DAG parse time of dags/answersheet_dags.py with 1, 10 and 50 roads (goal: 50 roads < 1 s).

Each size runs in a fresh Python process that does what Airflow's DAG processor does: import Airflow,
pre-import the `airflow.*` modules the DAG file imports ([dag_processor] parsing_pre_import_modules,
on by default), then parse the file with a DagBag (dagkit modules dropped from sys.modules before
each parse, as in the processor's forked child) and serialize its DAGs. Also reported: the first parse
without the pre-import (kubernetes client import included).

    .venv/bin/python bench/dag_parse.py [--sizes 1 10 50] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "answersheet_dags.py"
OUT = REPO / "bench" / "out"

CHILD = r"""
import json, sys, time
cold = sys.argv[1] == "cold"
repeat = int(sys.argv[2])
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization
from airflow.utils.file import iter_airflow_imports
import importlib
dag_file = sys.argv[3]
if not cold:
    for module in iter_airflow_imports(dag_file):
        importlib.import_module(module)
parse, serialize = [], []
for _ in range(1 if cold else repeat):
    for name in [m for m in sys.modules if m.startswith("answersheet_dagkit")]:
        del sys.modules[name]
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=dag_file)
    t1 = time.perf_counter()
    for dag in bag.dags.values():
        DagSerialization.to_dict(dag)
    t2 = time.perf_counter()
    assert not bag.import_errors, bag.import_errors
    parse.append(t1 - t0)
    serialize.append(t2 - t1)
print(json.dumps({"dags": len(bag.dags), "parse": parse, "serialize": serialize}))
"""


def roads_file(path: Path, n: int) -> Path:
    """The shipped roads file with n roads: every third sharded, every fifth on MIG slices."""
    doc = yaml.safe_load((REPO / "dags" / "roads.yaml").read_text(encoding="utf-8"))
    roads = []
    for i in range(n):
        road: dict = {"id": f"road_{i:03d}", "name": f"도로 {i}"}
        if i % 3 == 2:
            road["detect"] = {"shards": 4}
        if i % 5 == 4:
            road["kubernetes"] = {"pod_profile": {"detector": "mig-1g"}}
        roads.append(road)
    doc["roads"] = roads
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def measure(n: int, repeat: int, tmp: Path, cold: bool) -> dict:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "ANSWERSHEET_ROADS_FILE": str(roads_file(tmp / f"roads-{n}.yaml", n)), "PYTHONWARNINGS": "ignore"}
    env.pop("ANSWERSHEET_EXECUTION_MODE", None)
    out = subprocess.run([sys.executable, "-c", CHILD, "cold" if cold else "warm", str(repeat), str(DAG_FILE)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"parse of {n} roads failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="answersheet-bench-") as tmp:
        for n in args.sizes:
            warm = measure(n, args.repeat, Path(tmp), cold=False)
            cold = [measure(n, 1, Path(tmp), cold=True)["parse"][0] for _ in range(3)]
            rows.append({
                "roads": n, "dags": warm["dags"],
                "parse_median_s": statistics.median(warm["parse"]), "parse_max_s": max(warm["parse"]),
                "serialize_median_s": statistics.median(warm["serialize"]),
                "cold_parse_s": statistics.median(cold),
            })
    print(f"| roads | DAGs | parse (median of {args.repeat}) | parse (max) | + serialize (median) "
          "| parse without pre-import (median of 3 processes) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['roads']} | {r['dags']} | {r['parse_median_s']:.3f} s | {r['parse_max_s']:.3f} s | "
              f"{r['serialize_median_s']:.3f} s | {r['cold_parse_s']:.3f} s |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dag_parse.json").write_text(json.dumps(rows, indent=2))
    worst = next((r for r in rows if r["roads"] == 50), None)
    if worst and worst["parse_median_s"] >= 1.0:
        sys.exit(f"goal missed: 50 roads parse in {worst['parse_median_s']:.3f} s (goal < 1 s)")


if __name__ == "__main__":
    main()
