"""Session fixture for the dashboard tests: a runs root holding REAL short runs on the prepared tiny models.

    from dashboard_fixtures import dashboard_runs   # in a test module (tests/ is on sys.path)

Contents (names in RUNS): four unlearning runs (GRU on NPO+GD with every robustness probe, BLUR-NPO, NGDiff
with AutoLR probes, plain NPO with diagnostics every 2 steps and the relearn + quant4 probes), two 2-task
continual runs (ALKN sequential, NPO+GD sequential with the quant4 probe after the last task), one
corrupt run (truncated trace.parquet, invalid summary.json) and one run still being written (status
running, partial trace). Built once per test session - under pytest-xdist once for all workers (file
lock in the shared base temp folder) - in about a minute on 2 cores once lab.prepare's cache exists.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from filelock import FileLock

# fast settings: a few steps, few eval rows, short sequences
UNLEARN = dict(max_steps=6, batch_size=8, eval_limit=4, eval_batch_size=8, max_length=128)
UNLEARN_RUNS = {  # name -> (method, extra UnlearnConfig fields)
    "gru": ("gru_npo_gd", dict(diagnostics=1, probes=["relearn", "quant8", "quant4", "paraphrase", "fewshot"])),
    "blur": ("blur_npo", dict(diagnostics=1)),
    "ngdiff": ("ngdiff_autolr", dict(diagnostics=1, method_args={"autolr_every": 3})),
    "npo": ("npo", dict(diagnostics=2, probes=["relearn", "quant4"])),
}
CONTINUAL = dict(n_tasks=2, task_unit="rows", epochs=1, batch_size=8, max_length=128, eval_limit=2,
                 eval_max_new_tokens=16, eval_batch_size=8, lr=1e-3)
CONTINUAL_RUNS = {"alkn": "alkn", "npo_gd_seq": "npo_gd"}
CONTINUAL_PROBES = {"npo_gd_seq": ["quant4"]}   # robustness probes after the last task (lab.probes)
BROKEN, RUNNING = "broken", "running"
DONE_MARK = ".complete.json"     # written last: {name: run directory name}


def _build(root: Path) -> dict:
    """Create every run under root; returns {name: run path}."""
    from lab.continual import ContinualConfig, continual
    from lab.engine import UnlearnConfig, unlearn
    made, seconds = {}, {}
    for name, (method, extra) in UNLEARN_RUNS.items():
        t0 = time.time()
        res = unlearn(UnlearnConfig(method=method, runs_root=str(root), **{**UNLEARN, **extra}), progress=False)
        made[name], seconds[name] = res.run_dir, round(time.time() - t0, 1)
    for name, method in CONTINUAL_RUNS.items():
        t0 = time.time()
        res = continual(ContinualConfig(method=method, protocol="sequential", runs_root=str(root), **CONTINUAL,
                                        probes=CONTINUAL_PROBES.get(name, [])), progress=False)
        made[name], seconds[name] = res.run_dir, round(time.time() - t0, 1)
    # a corrupt copy: half a parquet file, summary.json that is not JSON
    broken = root / f"{made['gru'].name}-{BROKEN}"
    shutil.copytree(made["gru"], broken)
    data = (broken / "trace.parquet").read_bytes()
    (broken / "trace.parquet").write_bytes(data[: len(data) // 2])
    (broken / "summary.json").write_text('{"status": "done", "metrics": {')
    made[BROKEN] = broken
    # a run still being written: status running, first 3 trace rows, no eval yet
    import pandas as pd
    running = root / f"{made['blur'].name}-{RUNNING}"
    running.mkdir()
    shutil.copy(made["blur"] / "config.yaml", running / "config.yaml")
    pd.read_parquet(made["blur"] / "trace.parquet").head(3).to_parquet(running / "trace.parquet", index=False)
    (running / "summary.json").write_text(json.dumps({"status": "running", "started": "2026-01-01T00:00:00"}))
    made[RUNNING] = running
    (root / "fixture_seconds.json").write_text(json.dumps(seconds))
    return made


@pytest.fixture(scope="session")
def dashboard_runs(prepared_tiny, tmp_path_factory) -> dict:
    """{"root": Path, <name>: run Path for name in gru, blur, ngdiff, npo, alkn, npo_gd_seq, broken, running}."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker else base) / "dashboard-runs"
    with FileLock(str(root) + ".lock"):
        mark = root / DONE_MARK
        if mark.exists():
            made = {k: root / v for k, v in json.loads(mark.read_text()).items()}
        else:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            made = _build(root)
            mark.write_text(json.dumps({k: Path(v).name for k, v in made.items()}))
    return {"root": root, **made}


# every broken shape of every run file (lab.runs validates each on read): shape -> (file, content; None = cut
# the good file in half)
CORRUPT_SHAPES = {
    "summary-list": ("summary.json", "[1, 2]"), "summary-scalar": ("summary.json", "3"),
    "summary-truncated": ("summary.json", '{"status": "done", "metr'), "summary-empty": ("summary.json", ""),
    "config-list": ("config.yaml", "- a\n- b\n"), "config-scalar": ("config.yaml", "7\n"),
    "config-truncated": ("config.yaml", "method: [npo\n"), "config-empty": ("config.yaml", ""),
    "eval-list": ("eval.jsonl", '[{"step": 1}]\n'), "eval-scalar": ("eval.jsonl", '{"step": 0}\n5\n'),
    "eval-truncated": ("eval.jsonl", '{"step": 0, "chec'), "eval-empty": ("eval.jsonl", ""),
    "trace-truncated": ("trace.parquet", None), "trace-empty": ("trace.parquet", ""),
}


def write_corrupt_runs(root: Path, good: Path) -> dict:
    """One copy of the run `good` per CORRUPT_SHAPES entry under root, with that file broken; {shape: path}."""
    made = {}
    for shape, (name, content) in CORRUPT_SHAPES.items():
        path = root / f"{good.name}-{shape}"
        shutil.copytree(good, path)
        if content is None:
            data = (path / name).read_bytes()
            (path / name).write_bytes(data[: len(data) // 2])
        else:
            (path / name).write_text(content)
        made[shape] = path
    return made


@pytest.fixture(scope="session")
def corrupt_runs(dashboard_runs, tmp_path_factory) -> dict:
    """{"root": Path, "good": a copy of the npo fixture run, <shape>: its broken copy for shape in CORRUPT_SHAPES}."""
    root = tmp_path_factory.mktemp("corrupt-runs")
    good = root / dashboard_runs["npo"].name
    shutil.copytree(dashboard_runs["npo"], good)
    return {"root": root, "good": good, **write_corrupt_runs(root, good)}
