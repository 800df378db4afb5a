import json

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
