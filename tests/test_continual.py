"""lab.continual: task splits, the three protocols on the tiny preset (3 short tasks), resume equivalence,
the per-task table and the `lab continual` / `lab runs show` commands."""
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from lab import cli, continual as C, runs
from lab.data import get_benchmark, tofu_subset

SHORT = dict(n_tasks=3, task_unit="rows", epochs=1, batch_size=8, max_length=128, eval_limit=2,
             eval_max_new_tokens=16, eval_batch_size=8, progress=False)


# ---------------------------------------------------------------- tasks and config (no model)
def test_tofu_task_splits(shared_data):
    bench = tofu_subset(n_retain_authors=2, n_forget_authors=2)
    by_author = C.continual_tasks(bench)
    assert [len(t) for t in by_author] == [20, 20]
    assert [set(t["author"]) for t in by_author] == [{198}, {199}] and by_author[1]["task"][0] == 1
    rows = C.continual_tasks(bench, 3, "rows")
    assert [len(t) for t in rows] == [13, 14, 13]
    assert sum((list(t["row"]) for t in rows), []) == list(bench.forget["row"])        # in order, disjoint
    with pytest.raises(ValueError, match=r"valid n_tasks: \[1, 2\]"):
        C.continual_tasks(bench, 3)
    f10 = C.continual_tasks(get_benchmark("tofu_forget10"))                       # ALKN: 5 x 4 authors
    assert [len(t) for t in f10] == [80] * 5 and [len(set(t["author"])) for t in f10] == [4] * 5
    assert C.task_data(rows, 2, "joint").num_rows == 40 and C.task_data(rows, 2, "sequential").num_rows == 13


def test_muse_tasks_are_the_sust_splits(shared_data):
    tasks = C.continual_tasks(get_benchmark("muse_news"))
    assert len(tasks) == 4 and all("text" in t.column_names and len(t) > 0 for t in tasks)
    with pytest.raises(ValueError, match="valid: 1..4"):
        C.continual_tasks(get_benchmark("muse_news"), 5)


def test_config_validation_and_lr_decay_defaults():
    assert C.ContinualConfig(method="NPO+RT").decay == 0.5              # baselines halve (ALKN App. E.1)
    assert C.ContinualConfig(method="tv").decay == 0.5
    assert C.ContinualConfig(method="alkn").decay == 1.0
    assert C.ContinualConfig(method="alkn", lr_decay=0.7).decay == 0.7
    cfg = C.ContinualConfig(method="alkn_wo_esl", method_args={"lam": 0.5})
    assert (cfg.kind, cfg.inner_method, cfg.opts["lam"]) == ("alkn", "finetune_forget", 0.5)
    assert C.ContinualConfig(method="tru").opts == {"n_batches": 4, "stg": 0.75}
    with pytest.raises(ValueError, match="protocol='parallel'"):
        C.ContinualConfig(protocol="parallel")
    with pytest.raises(ValueError, match="continual also runs: .*alkn_wo_apm.*'tru'"):
        C.ContinualConfig(method="npo_zz")
    with pytest.raises(ValueError, match="unknown options"):
        C.ContinualConfig(method="tru", method_args={"strength": 1})


def test_task_table_layout():
    evals = pd.DataFrame([
        {"task": -1, "eval_task": None, "checkpoint": "initial", "model_utility": 0.5},
        {"task": -1, "eval_task": 0, "checkpoint": "initial", "forget_rouge": 0.9, "forget_prob": 0.8},
        {"task": -1, "eval_task": 1, "checkpoint": "initial", "forget_rouge": 0.95, "forget_prob": 0.85},
        {"task": 0, "eval_task": None, "checkpoint": "unlearned", "model_utility": 0.4, "lr": 1e-3},
        {"task": 0, "eval_task": 0, "checkpoint": "unlearned", "forget_rouge": 0.3, "forget_prob": 0.1},
        {"task": 0, "eval_task": 1, "checkpoint": "unlearned", "forget_rouge": 0.7, "forget_prob": 0.6},
    ])
    table = C.task_table(evals)
    assert list(table.index) == ["initial", "after 0"]
    assert list(table.columns) == ["model_utility", "lr", "forget_rouge[0]", "forget_rouge[1]",
                                   "forget_prob[0]", "forget_prob[1]"]
    assert table.loc["after 0", "forget_rouge[1]"] == 0.7 and table.loc["initial", "model_utility"] == 0.5
    assert C.task_table(pd.DataFrame()).empty


# ---------------------------------------------------------------- runs on the prepared tiny models
def _records(path):
    return [json.loads(line) for line in (path / runs.EVAL).read_text().splitlines()]


def _check_records(path, n_tasks=3):
    recs = _records(path)
    assert len(recs) == (n_tasks + 1) * (n_tasks + 1)                # per checkpoint: utility + every task
    util = [r for r in recs if r["eval_task"] is None]
    assert [(r["task"], r["checkpoint"]) for r in util] == [(-1, "initial")] + [(t, "unlearned") for t in range(n_tasks)]
    per = [r for r in recs if r["eval_task"] is not None]
    for r in per:   # every task's forget set after every task, FQ against the retain model on the same rows
        assert 0 <= r["forget_prob"] <= 1 and 0 <= r["forget_rouge"] <= 1 and 0 <= r["forget_quality"] <= 1
        assert {"mia_min_k_auc", "privleak", "forget_truth_ratio"} <= set(r)
    for r in util[1:]:
        assert 0 <= r["model_utility"] <= 1 and 0 < r["tv_moved_fraction"] <= 1
        assert math.isfinite(r["predicted_retain_change"]) and r["update_norm"] > 0
    return util, per


def test_sequential_baseline_halves_lr_and_cascades(prepared_tiny, tmp_path):
    res = C.continual(method="npo_rt", protocol="sequential", lr=1e-3, runs_root=tmp_path, **SHORT)
    util, per = _check_records(res.run_dir)
    assert [r["lr"] for r in util[1:]] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    trace = runs.load_run(res.run_dir).trace
    assert trace.groupby("task").size().tolist() == [2, 2, 2]         # ceil(13/8), ceil(14/8), ceil(13/8)
    assert trace["step"].tolist() == list(range(6)) and trace["loss_r"].notna().all()
    # cascading degradation record: task 2's forget prob before any unlearning and after tasks 0, 1
    p2 = {r["task"]: r["forget_prob"] for r in per if r["eval_task"] == 2}
    assert set(p2) == {-1, 0, 1, 2}
    assert list(res.table.index) == ["initial", "after 0", "after 1", "after 2"]
    assert not (res.run_dir / runs.MASKS).exists()                       # masks are ALKN's


def test_tasks_beyond_the_prepares_evaluated_rows_score_the_reference_on_them(prepared_tiny, tmp_path):
    # the prepare evaluated 2 rows per set; tasks 1 and 2 start at forget rows 13 and 27 (was: ValueError
    # "reference lacks ... rows"): their reference rows are scored by the retain model and cached
    res = C.continual(method="npo_rt", protocol="independent", lr=1e-3, runs_root=tmp_path,
                      prepare={"eval_limit": 2}, **SHORT)
    _, per = _check_records(res.run_dir)
    fq = [r["forget_quality"] for r in per if r["eval_task"] is not None]
    assert len(fq) == 4 * 3 and all(0 <= q <= 1 for q in fq), fq
    assert len(list((prepared_tiny.path / "reference_rows").glob("*.parquet"))) >= 1


def test_independent_alkn_starts_every_task_from_theta0(prepared_tiny, tmp_path):
    res = C.continual(method="alkn", protocol="independent", lr=1e-3, runs_root=tmp_path, **SHORT)
    util, _ = _check_records(res.run_dir)
    assert [r["lr"] for r in util[1:]] == [1e-3] * 3
    assert [r["mask_jaccard_prev"] for r in util[1:]] == [None] * 3      # no union mask M across tasks
    assert all(abs(r["active_fraction"] - 0.3) < 0.05 for r in util[1:])
    state = json.loads((res.run_dir / "checkpoint" / "state.json").read_text())
    assert state["task_done"] == 2 and not (res.run_dir / "checkpoint" / "params.pt").exists()
    masks_df = runs.load_run(res.run_dir).masks
    assert set(zip(masks_df["task_a"], masks_df["task_b"])) == {(0, 1), (0, 2), (1, 2)}
    trace = runs.load_run(res.run_dir).trace
    assert (trace.groupby("task")["active_fraction"].first() == 1.0).all()   # rho starts at 1 every task


def test_joint_tv_through_the_cli(prepared_tiny, tmp_path, capsys):
    root = tmp_path / "runs"
    rc = cli.main(["continual", "--method", "tv", "--protocol", "joint", "--n-tasks", "3", "--task-unit", "rows",
                   "--epochs", "1", "--batch-size", "8", "--eval-limit", "2", "--lr", "1e-3", "--runs", str(root),
                   "--set", "max_length=128", "eval_max_new_tokens=16", "eval_batch_size=8"])
    assert rc == 0
    run_dir = runs.find_runs(root)[0]
    util, _ = _check_records(run_dir)
    trace = runs.load_run(run_dir).trace
    assert trace.groupby("task").size().tolist() == [2, 4, 5]         # unions of 13, 27, 40 rows
    assert [r["lr"] for r in util[1:]] == pytest.approx([1e-3, 5e-4, 2.5e-4])   # per_task: TV halves in joint too
    capsys.readouterr()
    assert cli.main(["runs", "show", run_dir.name, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "forget_rouge[2]" in out and "after 2" in out and "model_utility" in out


@pytest.mark.slow
def test_resume_gives_the_same_results(prepared_tiny, tmp_path, monkeypatch):
    kw = dict(method="alkn", protocol="sequential", lr=1e-3, **SHORT)
    full = C.continual(runs_root=tmp_path / "a", **kw)

    real = C.alkn.alkn_task

    def crash_in_task_1(*args, **k):
        if k.get("task") == 1:
            raise RuntimeError("simulated crash")
        return real(*args, **k)
    monkeypatch.setattr(C.alkn, "alkn_task", crash_in_task_1)
    with pytest.raises(runs.RunStopped, match="simulated crash"):
        C.continual(runs_root=tmp_path / "b", **kw)
    monkeypatch.setattr(C.alkn, "alkn_task", real)
    broken = runs.find_runs(tmp_path / "b")[0]
    assert runs.load_run(broken).status == "failed"
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["task_done"] == 0
    resumed = C.continual(resume=broken, progress=False)

    def clean(path):
        return [{k: v for k, v in r.items() if k not in C.TIME_KEYS} for r in _records(path)]
    assert clean(resumed.run_dir) == clean(full.run_dir)                  # identical numbers, same records
    assert all(torch.equal(p, q) for p, q in zip(full.model.parameters(), resumed.model.parameters()))
    a, b = runs.load_run(full.run_dir), runs.load_run(resumed.run_dir)
    assert a.status == b.status == "done"
    pd.testing.assert_frame_equal(a.trace, b.trace[a.trace.columns], check_dtype=False)
    pd.testing.assert_frame_equal(a.masks, b.masks)
    util, _ = _check_records(resumed.run_dir)
    assert util[1]["mask_jaccard_prev"] is None and util[2]["mask_jaccard_prev"] is not None
    assert (resumed.run_dir / "checkpoint" / "union_mask.npz").exists()
    with pytest.raises(ValueError, match="already finished"):
        C.continual(resume=resumed.run_dir)


# ---------------------------------------------------------------- one writer per run, resume by id, safe checkpoints
HOLDER = """
import pathlib, sys, time
from lab import continual as C
real, calls = C.evaluate_tasks, []

def held(*a, **k):   # after task 0's unlearning, hold the run open until the test is done with it
    calls.append(1)
    if len(calls) == 2:
        print("HOLDING", flush=True)
        while True:
            time.sleep(1)
    return real(*a, **k)
C.evaluate_tasks = held
C.continual(method="npo_gd", protocol="sequential", lr=1e-3, runs_root=sys.argv[1], n_tasks=2, task_unit="rows",
            epochs=1, batch_size=8, max_length=128, eval_limit=2, eval_max_new_tokens=16, eval_batch_size=8,
            progress=False)
"""


@pytest.mark.slow
def test_a_live_run_refuses_a_second_writer_and_a_killed_one_resumes_by_id(prepared_tiny, tmp_path):
    root = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        (path,) = runs.find_runs(root)
        lab_cmd = [sys.executable, "-m", "lab"]
        second = subprocess.run([*lab_cmd, "continual", "--resume", path.name, "--runs", str(root)],
                                capture_output=True, text=True)
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("lab continual")]
        assert second.returncode == 1 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"being written by pid {holder.pid} on " in errors[0]
        assert runs.load_run(path).status == "running"
    finally:
        holder.kill()
        holder.wait()
    listed = subprocess.run([*lab_cmd, "runs", "--root", str(root)], capture_output=True, text=True, check=True).stdout
    assert "stale" in listed and f"writer gone (pid {holder.pid}" in listed
    refused = subprocess.run([*lab_cmd, "continual", "--resume", path.name, "--runs", str(root), "--lr", "1e-2"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "drop --lr (they would change the run)" in refused.stderr
    resumed = subprocess.run([*lab_cmd, "continual", "--resume", path.name, "--runs", str(root)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    rec = runs.load_run(path)
    assert rec.status == "done" and not (path / runs.LOCK).exists()
    keys = [(r["task"], r["eval_task"], r["checkpoint"]) for r in _records(path)]
    assert len(keys) == len(set(keys)) == 9                              # (1 + 2 tasks) x (utility + 2 tasks)
    assert rec.trace["step"].tolist() == list(range(len(rec.trace)))    # no duplicated trace rows either


class Payload:
    """Pickles to a call of open(): what a crafted params.pt could make an unsafe torch.load do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_refuses_a_checkpoint_that_is_not_plain_tensors(prepared_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # the default of torch < 2.6 (pyproject allows it)
    path = tmp_path / "run"
    (path / "checkpoint").mkdir(parents=True)
    cfg = {k: v for k, v in SHORT.items() if k != "progress"}
    (path / runs.CONFIG).write_text(yaml.safe_dump({"kind": "continual", "method": "npo_gd", **cfg,
                                                    "n_tasks": 3, "runs_root": str(tmp_path)}))
    (path / runs.SUMMARY).write_text(json.dumps({"status": "failed"}))
    (path / "checkpoint" / "state.json").write_text(json.dumps({"task_done": 0, "global_step": 2}))
    marker = tmp_path / "payload-ran"
    torch.save([Payload(str(marker))], path / "checkpoint" / "params.pt")
    with pytest.raises(ValueError, match="holds more than tensors; refusing to unpickle it"):
        C.continual(resume=path, progress=False)
    assert not marker.exists()
    assert not (path / runs.LOCK).exists()                              # the lock is given back on failure


# ---------------------------------------------------------------- lr schedule across protocols (ALKN fig. 2b)
# eval_limit 2: on 1 row the MIA AUC is 0 or 1 and PrivLeak is undefined
FAST = dict(n_tasks=2, task_unit="rows", max_steps=1, batch_size=8, max_length=128, eval_limit=2,
            eval_max_new_tokens=8, eval_batch_size=8, task_diagnostics=False, checkpoint=False, progress=False)


def test_lr_schedule_is_validated_and_decays_in_every_protocol_by_default():
    with pytest.raises(ValueError, match=r"lr_schedule='halving'; valid: \['per_task', 'sequential_only'\]"):
        C.ContinualConfig(method="ga_rt", lr_schedule="halving")
    for protocol in C.PROTOCOLS:
        cfg = C.ContinualConfig(method="ga_rt", protocol=protocol, lr=1e-3)
        assert [cfg.task_lr(t) for t in range(3)] == pytest.approx([1e-3, 5e-4, 2.5e-4]), protocol
    old = C.ContinualConfig(method="ga_rt", protocol="joint", lr=1e-3, lr_schedule="sequential_only")
    assert [old.task_lr(t) for t in range(3)] == [1e-3] * 3


@pytest.mark.parametrize("schedule, expected", [("per_task", [1e-3, 5e-4]), ("sequential_only", [1e-3, 1e-3])])
def test_independent_baseline_lr_follows_lr_schedule(prepared_tiny, tmp_path, schedule, expected):
    res = C.continual(method="ga_rt", protocol="independent", lr=1e-3, lr_schedule=schedule, runs_root=tmp_path,
                      **FAST)
    rec = runs.load_run(res.run_dir)
    assert rec.config["lr_schedule"] == schedule                         # recorded in config.yaml
    util = rec.evals[rec.evals["eval_task"].isna() & (rec.evals["checkpoint"] == "unlearned")]
    assert util["lr"].tolist() == pytest.approx(expected)                # the per-task record
    assert rec.trace.groupby("task")["lr"].first().tolist() == pytest.approx(expected)   # the optimizer's lr


def test_resume_of_a_run_without_lr_schedule_keeps_the_old_behaviour(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / runs.CONFIG).write_text(yaml.safe_dump({"kind": "continual", "method": "ga_rt", "protocol": "joint",
                                                    "lr": 1e-3, "runs_root": str(tmp_path)}))
    (path / runs.SUMMARY).write_text(json.dumps({"status": "failed"}))
    cfg = C._config_from_run(path)
    assert cfg.lr_schedule == "sequential_only" and cfg.task_lr(1) == 1e-3


# ---------------------------------------------------------------- LoRA: one adapter trained across the tasks
LORA = "r=4,alpha=8,dropout=0,targets=q_proj,v_proj"
LORA_DICT = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
LORA_RUN = dict(method="ga_rt", protocol="sequential", lr=1e-3, n_tasks=2, task_unit="rows", max_steps=2,
                batch_size=8, max_length=128, eval_limit=2, eval_max_new_tokens=8, eval_batch_size=8, lora=LORA,
                save_model=True, progress=False)


def test_lora_is_refused_by_the_arithmetic_methods_and_fsdp():
    for method in ("alkn", "alkn_wo_dgs", "tv", "tru"):
        with pytest.raises(ValueError, match=rf"lora: continual method '{method}' works on the full weights.*"
                                             r"engine methods .*: .*ga_rt.*npo_gd"):
            C.ContinualConfig(method=method, lora=LORA)
    with pytest.raises(ValueError, match="lora: not with --parallel fsdp"):      # as lab unlearn
        C.ContinualConfig(method="ga_rt", lora=LORA, parallel="fsdp")
    with pytest.raises(ValueError, match="lora: not with .*rmu"):
        C.ContinualConfig(method="rmu", lora=LORA)
    assert "rmu" not in C.lora_methods() and {"ga_rt", "npo_gd", "gru_npo"} <= set(C.lora_methods())
    assert C.ContinualConfig(method="npo_rt", lora=LORA, parallel="ddp").lora == LORA_DICT
    assert C.ContinualConfig(method="ga_rt").lora is None


@pytest.fixture(scope="module")
def lora_run(prepared_tiny, tmp_path_factory):
    return C.continual(runs_root=tmp_path_factory.mktemp("lora") / "full", **LORA_RUN)


def test_lora_sequential_trains_only_the_adapter(prepared_tiny, lora_run):
    res = lora_run
    model = res.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)                    # the gradient lists: the adapter
    base_state = prepared_tiny.load("target")[0].state_dict()
    for name, p in model.get_base_model().named_parameters():           # base weights bit-identical to theta_0
        if "lora_" in name:
            if "lora_B" in name:
                assert p.abs().sum() > 0, name                          # B starts at 0: the adapter moved
            continue
        assert torch.equal(p, base_state[name.replace(".base_layer", "")]), name
    rec = runs.load_run(res.run_dir)
    assert rec.config["lora"] == LORA_DICT                               # config.yaml records the adapter
    assert rec.trace.groupby("task").size().tolist() == [2, 2]
    util = rec.evals[rec.evals["eval_task"].isna()]
    assert [(t, c) for t, c in zip(util["task"], util["checkpoint"])] == [(-1, "initial"), (0, "unlearned"),
                                                                          (1, "unlearned")]
    per = rec.evals[rec.evals["eval_task"].notna()]
    assert len(per) == 3 * 2 and per["forget_prob"].between(0, 1).all()
    p0 = dict(zip(per[per["eval_task"] == 0]["task"], per[per["eval_task"] == 0]["forget_prob"]))
    assert p0[0] != p0[-1]                                               # evaluated on the merged model
    after = util[util["checkpoint"] == "unlearned"]
    assert (after["update_norm"] > 0).all() and (after["tv_moved_fraction"] > 0).all()   # adapter coordinates
    assert after["lr"].tolist() == pytest.approx([1e-3, 5e-4])
    # checkpoint: the adapter's values; --save-model: merged weights + the adapter
    saved = C._load_params(res.run_dir / "checkpoint" / "params.pt")
    assert len(saved) == len(names) and all(torch.equal(s, p) for s, p in zip(
        saved, (p for p in model.parameters() if p.requires_grad)))
    assert (res.run_dir / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM
    merged = C.lora.merged_copy(model).state_dict()
    out = AutoModelForCausalLM.from_pretrained(res.run_dir / "model").state_dict()
    assert not any("lora" in k for k in out) and all(torch.equal(v, merged[k]) for k, v in out.items())


def test_lora_resume_restores_the_adapter(prepared_tiny, lora_run, tmp_path, crashing_task):
    crashing_task(lambda: C.continual(runs_root=tmp_path, **LORA_RUN))
    (broken,) = runs.find_runs(tmp_path)
    resumed = C.continual(resume=broken, progress=False)

    def clean(path):
        return [{k: v for k, v in r.items() if k not in C.TIME_KEYS} for r in _records(path)]
    assert clean(resumed.run_dir) == clean(lora_run.run_dir)             # the same records as without the crash
    assert all(torch.equal(p, q) for p, q in zip(lora_run.model.parameters(), resumed.model.parameters()))


def test_lora_through_the_cli(monkeypatch, capsys):
    seen = []

    def fake(cfg):   # the config the command builds, validated as continual() would
        seen.append(C.ContinualConfig(**cfg))
        return C.ContinualResult(None, None, None, pd.DataFrame(), pd.DataFrame(), {})
    monkeypatch.setattr(C, "continual", fake)
    assert cli.main(["continual", "--method", "npo_rt", "--lora", LORA]) == 0
    assert seen[0].lora == LORA_DICT and seen[0].kind == "engine"
    assert cli.main(["continual", "--method", "alkn", "--lora", LORA]) != 0      # the refusal, as a CLI error
    assert "lora: continual method 'alkn' works on the full weights" in capsys.readouterr().err
