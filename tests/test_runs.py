import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lab import runs


def _write_run(root, method="GA", steps=3, fail=None):
    cfg = {"kind": "unlearn", "method": method, "model": "tiny", "benchmark": "tofu_subset", "seed": 0}
    with runs.create_run(cfg, root=root) as run:
        for s in range(steps):
            run.log_step({"step": s, "epoch": 0, "loss_f": 1.0 + s, "cos_fr": -0.5 * s, "lr": 1e-3})
            if fail is not None and s == fail:
                raise fail_exc
        run.log_eval({"step": steps, "checkpoint": "unlearned", "forget_rouge": 0.25, "model_utility": 0.5},
                     rows=pd.DataFrame({"set": ["forget"], "row": [0], "rouge": [0.25]}))
    return run.path


fail_exc = RuntimeError("boom")


def test_run_directory_files_and_roundtrip(tmp_path):
    path = _write_run(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [runs.CONFIG, runs.TRACE, runs.EVAL, runs.EVAL_ROWS, runs.SUMMARY])
    cfg = yaml.safe_load((path / runs.CONFIG).read_text())
    assert cfg["method"] == "GA" and cfg["seed"] == 0 and "lab_version" in cfg
    summary = json.loads((path / runs.SUMMARY).read_text())
    assert summary["status"] == "done" and "finished" in summary
    rec = runs.load_run(path)
    assert rec.errors == []
    assert list(rec.trace["step"]) == [0, 1, 2]
    assert rec.trace["loss_f"].tolist() == [1.0, 2.0, 3.0]
    assert rec.evals.iloc[0]["forget_rouge"] == 0.25
    assert rec.rows.iloc[0]["checkpoint"] == "unlearned"
    # no temp files left behind by the atomic writes
    assert not [p for p in path.iterdir() if p.name.startswith(".")]


def test_same_config_in_the_same_second_gets_numbered_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "make_run_id", lambda config: "20261123-000000-unlearn-ga-abcdef")
    paths = []
    for _ in range(3):
        with runs.create_run({"kind": "unlearn", "method": "ga"}, root=tmp_path) as run:
            paths.append(run.path.name)
    assert paths == ["20261123-000000-unlearn-ga-abcdef", "20261123-000000-unlearn-ga-abcdef-2",
                     "20261123-000000-unlearn-ga-abcdef-3"]
    with pytest.raises(FileExistsError):   # an explicit run id is never renamed
        with runs.create_run({}, root=tmp_path, run_id=paths[0]):
            pass


def test_failed_run_leaves_no_directory(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _write_run(tmp_path, fail=1)
    assert list(tmp_path.iterdir()) == []


def test_run_stopped_keeps_trace_with_status(tmp_path):
    cfg = {"kind": "unlearn", "method": "GA"}
    with pytest.raises(runs.RunStopped):
        with runs.create_run(cfg, root=tmp_path) as run:
            run.log_step({"step": 0, "loss_f": 1.0})
            raise runs.RunStopped("loss_f is nan at step 1", status="diverged")
    (path,) = tmp_path.iterdir()
    rec = runs.load_run(path)
    assert rec.status == "diverged" and "nan" in rec.summary["error"]
    assert len(rec.trace) == 1


def test_load_runs_long_form(tmp_path):
    _write_run(tmp_path, method="GA", steps=3)
    _write_run(tmp_path, method="NPO", steps=2)
    df = runs.load_runs(tmp_path)
    assert df["run_id"].nunique() == 2
    trace = df[(df.source == "trace") & (df.metric == "loss_f")]
    assert sorted(trace.groupby("method").size().to_dict().items()) == [("GA", 3), ("NPO", 2)]
    ev = df[(df.source == "eval") & (df.metric == "model_utility")]
    assert ev["value"].tolist() == [0.5, 0.5] and set(ev["checkpoint"]) == {"unlearned"}
    listed = runs.list_runs(tmp_path)
    assert sorted(listed["method"]) == ["GA", "NPO"] and set(listed["status"]) == {"done"}
    with pytest.raises(ValueError, match="valid"):
        runs.load_runs(tmp_path, kinds=("bogus",))


def test_corrupt_and_partial_runs_are_reported_not_raised(tmp_path):
    good = _write_run(tmp_path)
    bad = tmp_path / "broken-run"
    bad.mkdir()
    (bad / runs.CONFIG).write_text("method: [unclosed\n")
    (bad / runs.TRACE).write_bytes(b"not parquet")
    rec = runs.load_run(bad)
    assert any("unreadable" in e for e in rec.errors) and any("summary.json: missing" in e for e in rec.errors)
    assert rec.status == "broken"
    listed = runs.list_runs(tmp_path)
    assert set(listed["run_id"]) == {good.name, "broken-run"}
    # the long table still has the good run
    assert set(runs.load_runs(tmp_path)["run_id"]) == {good.name}


def test_atomic_write_does_not_clobber_on_failure(tmp_path):
    target = tmp_path / "x.json"
    runs.atomic_write_json(target, {"a": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        runs.atomic_write_json(target, {"a": Unserialisable()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ---------------------------------------------------------------- interruptions, writers, broken files
def test_ctrl_c_keeps_the_run_marked_interrupted(tmp_path):
    cfg = {"kind": "unlearn", "method": "GA"}
    with pytest.raises(KeyboardInterrupt) as info:      # RunInterrupted is a KeyboardInterrupt
        with runs.create_run(cfg, root=tmp_path) as run:
            run.log_eval({"step": 0, "checkpoint": "initial", "forget_rouge": 0.9})
            for s in range(13):
                run.log_step({"step": s, "loss_f": 1.0})
            raise KeyboardInterrupt
    (path,) = tmp_path.iterdir()
    assert isinstance(info.value, runs.RunInterrupted) and info.value.run_dir == path and str(path) in str(info.value)
    rec = runs.load_run(path)
    assert rec.status == "interrupted" and "13 trace rows" in rec.summary["error"] and rec.errors == []
    assert len(rec.trace) == 13 and list(rec.evals["checkpoint"]) == ["initial"]
    assert not (path / runs.LOCK).exists()
    assert runs.list_runs(tmp_path)["status"].tolist() == ["interrupted"]


def test_ctrl_c_before_anything_was_written_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with runs.create_run({"kind": "unlearn"}, root=tmp_path):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys, time
from lab import runs
with runs.create_run({"kind": "unlearn", "method": "GA"}, root=sys.argv[1]) as run:
    print(run.path, flush=True)
    for s in range(100000):
        run.log_step({"step": s, "loss_f": 1.0})
        time.sleep(0.01)
"""


def _start_writer(root):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.readline().strip())
    _wait_for(lambda: (path / runs.TRACE).exists() and len(runs.load_run(path).trace) >= 3, proc)
    return proc, path


def _wait_for(condition, proc, limit=120):
    deadline = time.monotonic() + limit   # a bound against hanging, not a timing claim
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "writer exited or never got there"
        time.sleep(0.1)


def test_sigint_to_a_writing_process_keeps_its_run(tmp_path):
    proc, path = _start_writer(tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    rec = runs.load_run(path)
    assert rec.status == "interrupted" and len(rec.trace) >= 3 and rec.errors == []
    assert rec.trace["step"].tolist() == list(range(len(rec.trace)))      # every logged row flushed


def test_kill_9_leaves_a_stale_run_with_its_trace_and_a_second_writer_waits_for_a_live_one(tmp_path):
    proc, path = _start_writer(tmp_path)
    try:
        live = runs.load_run(path)
        assert live.status == "running" and live.writer["alive"] and live.writer["pid"] == proc.pid
        assert f"pid {proc.pid}" in live.status_note
        with pytest.raises(runs.RunLocked, match=f"being written by pid {proc.pid} on "):
            runs.WriterLock(path).acquire()
        with pytest.raises(runs.RunLocked, match=f"pid {proc.pid}"):
            runs.append_eval(path, {"checkpoint": "uwc", "x": 1})
    finally:
        proc.kill()
        proc.wait()
    rec = runs.load_run(path)
    assert rec.summary["status"] == "running" and rec.status == "stale"
    assert rec.status_note.startswith("stale: writer gone (pid %d" % proc.pid)
    assert len(rec.trace) >= 3                                   # rows reached the disk before 50 steps
    listed = runs.list_runs(tmp_path)
    assert listed["status"].tolist() == ["stale"] and "writer gone" in listed["note"][0]
    lock = runs.WriterLock(path).acquire()                       # a dead writer's run can be taken over
    assert json.loads((path / runs.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (path / runs.LOCK).exists()


def test_trace_is_flushed_by_time_not_only_every_50_rows(tmp_path, monkeypatch):
    with runs.create_run({"kind": "unlearn"}, root=tmp_path) as run:
        run.log_step({"step": 0, "loss_f": 1.0})                 # the first row is written at once
        assert len(pd.read_parquet(run.path / runs.TRACE)) == 1
        monkeypatch.setattr(runs, "FLUSH_SECONDS", 0.0)
        run.log_step({"step": 1, "loss_f": 1.0})
        assert len(pd.read_parquet(run.path / runs.TRACE)) == 2
        monkeypatch.setattr(runs, "FLUSH_SECONDS", 1e9)
        run.log_step({"step": 2, "loss_f": 1.0})
        assert len(pd.read_parquet(run.path / runs.TRACE)) == 2  # within the interval: buffered


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _write_run(tmp_path)
        runs.atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*path.iterdir(), tmp_path / "x.json"]}
    assert set(modes.values()) == {0o644}, modes
    old = os.umask(0o077)
    try:
        runs.atomic_write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.parquet").stat().st_mode) == 0o600


BROKEN_SHAPES = {   # file -> {shape: content}
    runs.SUMMARY: {"list": "[1, 2]", "scalar": "3", "truncated": '{"status": "done", "metr', "empty": "",
                   "bad_status": '{"status": ["done"]}'},
    runs.CONFIG: {"list": "- a\n- b\n", "scalar": "7\n", "truncated": "method: [unclosed\n", "empty": ""},
    runs.EVAL: {"list": '[{"step": 1}]\n', "scalar": '{"step": 0}\n5\n', "truncated": '{"step": 0}\n{"ste',
                "empty": ""},
    runs.TRACE: {"truncated": None, "empty": "", "no_step": None},
}


@pytest.mark.parametrize("name,shape", [(n, s) for n, shapes in BROKEN_SHAPES.items() for s in shapes])
def test_every_run_file_is_validated_on_read(tmp_path, name, shape):
    good = _write_run(tmp_path)
    bad = tmp_path / f"broken-{shape}"
    shutil.copytree(good, bad)
    content = BROKEN_SHAPES[name][shape]
    if name == runs.TRACE and shape == "truncated":
        data = (bad / runs.TRACE).read_bytes()
        (bad / runs.TRACE).write_bytes(data[:len(data) // 2])
    elif name == runs.TRACE and shape == "no_step":
        pd.DataFrame({"loss": [1.0]}).to_parquet(bad / runs.TRACE)
    else:
        (bad / name).write_text(content)
    rec = runs.load_run(bad)
    assert any(e.startswith(f"{bad / name}: unreadable") for e in rec.errors), rec.errors
    assert isinstance(rec.summary, dict) and isinstance(rec.config, dict)
    assert rec.status in ("broken", "done")
    listed = runs.list_runs(tmp_path)
    assert set(listed["run_id"]) == {good.name, bad.name}
    assert listed.set_index("run_id").loc[bad.name, "errors"]
    assert set(runs.load_runs(tmp_path)["run_id"]) >= {good.name}
