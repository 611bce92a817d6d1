"""`make demo` beside a competing load: one reduced demo workload timed quiet and under load, in one run.

    .venv/bin/python benchmarks/bench_demo_load.py [--out runs/bench-demo-load] [--load-threads 2] [--fresh]

Workload (reduced from the demo, stated): notebook 02_score (the proxy warm-up, the K-FAC fit of
Quad's estimator with its eigendecompositions, and scoring: the step where the demo collapsed,
1,201 s under load against 107 s quiet) run by the demo's own runner (`quadlib.reports.execute_notebook`, papermill)
with the demo's proxy `tiny-llama` at reduced sizes (WORKLOAD below). Its input, 01_cluster at test
size (300 documents, k=8), is made once and not timed; every timed run starts from a fresh copy of
it, so nothing is reused. The notebook keeps the demo's threading (quadlib.device.cap_threads: as
many threads as cores given).

Competing load: `--load-threads` processes spinning on the CPU, started before the loaded run and
stopped after it ("two other processes busy on the 2 cores", issue 12). Prints the seconds of each
run and loaded / quiet; the target is <= 3x. Each finished run is kept in <out>/results.json and a
rerun skips it (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from quadlib.device import cores_given
from quadlib.reports import REPO_ROOT, execute_notebook
from quadlib.runstore import write_json_atomic

SETUP = {"LIMIT": 300, "K": 8, "MAP_SAMPLE": 300}  # 01_cluster at test size
WORKLOAD = {"PROXY_MODEL": "tiny-llama", "TOKENIZER_VOCAB": 1024, "WARMUP_DOCS": 200, "WARMUP_STEPS": 4,
            "COMPARE": ["kfac_joint_qkv"], "FIT_DOCS": 16, "REFERENCE_DOCS": 16, "SAMPLES_PER_CLUSTER": 2}
PHASES = ("quiet", "loaded")


def _spin() -> None:
    """One busy thread of the competing load."""
    while True:
        pass


def timed_run(base: Path, folder: Path, reports: Path) -> float:
    """Notebook 02 on a fresh copy of the prepared run; its wall time in seconds."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    seconds = execute_notebook(REPO_ROOT / "notebooks" / "02_score.ipynb", reports / f"{folder.name}.ipynb",
                               WORKLOAD | {"RUN_DIR": str(folder)})
    shutil.rmtree(folder)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-demo-load", help="work folder and results.json")
    parser.add_argument("--load-threads", type=int, default=2, help="busy processes of the competing load")
    parser.add_argument("--fresh", action="store_true", help="forget finished runs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    results_path = out / "results.json"
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    base, reports = out / "base", out / "notebooks"
    if "setup" not in results:  # a setup that did not finish is redone from scratch
        print("setup: 01_cluster at test size (not timed)", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        results["setup"] = execute_notebook(REPO_ROOT / "notebooks" / "01_cluster.ipynb", reports / "01_cluster.ipynb",
                                            SETUP | {"RUN_DIR": str(base)})
        write_json_atomic(results_path, results)
    print(f"cores given: {cores_given()}; workload: 02_score with {WORKLOAD}", flush=True)
    for phase in PHASES:
        if phase in results:
            print(f"{phase}: {results[phase]:.0f} s (kept from an earlier run)", flush=True)
            continue
        load = []
        if phase == "loaded":
            context = multiprocessing.get_context("spawn")
            load = [context.Process(target=_spin, daemon=True) for _ in range(args.load_threads)]
            for process in load:
                process.start()
        try:
            start_load = os.getloadavg()[0]
            results[phase] = timed_run(base, out / phase, reports)
        finally:
            for process in load:
                process.terminate()
                process.join()
        results[f"{phase}_loadavg_at_start"] = start_load
        write_json_atomic(results_path, results)
        print(f"{phase}: {results[phase]:.0f} s (1-min load average at its start {start_load:.1f})", flush=True)
    ratio = results["loaded"] / results["quiet"]
    print(f"slowdown under a {args.load_threads}-thread load: {ratio:.2f}x (target <= 3x)", flush=True)
    write_json_atomic(results_path, results | {"ratio": ratio, "load_threads": args.load_threads})


if __name__ == "__main__":
    main()
