"""The engine loop on the tiny preset: every method runs, accumulation/DDP equivalence, AutoLR, NaN."""
import dataclasses
import math
import os
import socket
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset

from lab import engine, geometry, runs
from lab.engine import UnlearnConfig, accumulate, autolr_probe, unlearning_loop, would_be_update
from lab.methods import METHODS, get_method
from lab.objectives import OBJECTIVES, ObjectiveContext

ALL_METHODS = sorted({m.name for m in METHODS.values()})


@pytest.fixture(scope="module")
def bench():
    from lab.data import tofu_subset
    return tofu_subset(n_retain_authors=2, n_forget_authors=1)


def _fresh(seed=0):
    from lab.models import load_model
    return load_model("tiny", seed=seed)


def _cfg(**kw):
    base = dict(method="ga_rt", model="tiny", lr=1e-3, batch_size=4, max_steps=3, max_length=128,
                eval_batch_size=8)
    return UnlearnConfig(**{**base, **kw})


def _run(method, bench, tmp_path, **kw):
    model, tok = _fresh()
    cfg = _cfg(method=method, **kw)
    m, args = get_method(cfg.method, **cfg.method_args)
    from lab.data import idk_answers
    with runs.create_run({"kind": "unlearn", "method": m.name}, root=tmp_path) as run:
        state = unlearning_loop(model, tok, bench.forget, bench.retain, m, args, cfg, run=run,
                                idk_answers=idk_answers(), progress=False)
    return model, pd.DataFrame(state.trace), runs.load_run(run.path)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_runs_and_traces(name, bench, tmp_path):
    model, trace, rec = _run(name, bench, tmp_path)
    method = METHODS[name]
    assert len(trace) == 3 and rec.status == "done"
    assert set(runs.TRACE_COLUMNS) - {"cos_update_r"} <= set(rec.trace.columns) | {"task"}
    assert np.isfinite(trace["loss_f"]).all()
    # every method, forget-only ones included (a retain NLL is measured beside them), gets the geometry
    assert np.isfinite(trace[["loss_r", "grad_norm_f", "grad_norm_r", "cos_fr", "align_f", "align_r",
                              "cos_update_f", "cos_update_r", "lr"]]).all().all()
    if not method.retain and method.combiner == "sum":
        assert np.allclose(trace["align_f"], 1.0, atol=1e-5)   # d is g_f itself
    extras = {"gru": ["cos_pre", "cos_post", "projected"], "blur": ["xi"]}.get(method.combiner, [])
    assert set(extras) <= set(trace.columns)
    if method.autolr:
        assert trace["autolr_probe"].iloc[0] == 1.0 and "autolr_lr" in trace


@pytest.mark.parametrize("name", ["npo+autolr", "lossnorm+autolr"])
def test_autolr_on_other_methods_probes_the_retain_loss(name, bench, tmp_path):
    # forget-only NPO probes the retain NLL (measured, not trained on); LossNorm its own retain loss
    _, trace, rec = _run(name, bench, tmp_path, max_steps=4, diagnostics=0, method_args={"autolr_every": 2})
    probes = trace[trace["autolr_probe"] == 1.0]
    assert list(probes.index) == [0, 2] and np.isfinite(probes[["autolr_loss_minus", "autolr_loss_0",
                                                                "autolr_loss_plus"]]).all().all()
    # the probe's centre point is the retain loss at theta; each later step uses the lr the probe chose
    for i in probes.index:
        assert trace["lr"].iloc[i] == pytest.approx(probes.loc[i, "autolr_lr"])
        assert trace["lr"].iloc[i + 1] == pytest.approx(probes.loc[i, "autolr_lr"])
    if name == "lossnorm+autolr":
        assert np.allclose(probes["autolr_loss_0"], trace.loc[probes.index, "loss_r"], rtol=1e-5)


def test_geometry_invariants_in_the_trace(bench, tmp_path):
    _, blur, _ = _run("blur_npo", bench, tmp_path / "b", method_args={"gamma": 0.7})
    assert np.allclose(blur["align_f"], 0.7, atol=1e-4)              # BLUR: A_f == gamma exactly
    _, ng, _ = _run("ngdiff", bench, tmp_path / "n")
    assert (ng["align_f"] >= -1e-6).all() and (ng["align_r"] >= -1e-6).all()   # NGDiff Lemma 4
    _, gru, _ = _run("gru_gd", bench, tmp_path / "g")
    assert (gru["cos_post"] >= -1e-5).all()


def test_diagnostics_every_k(bench, tmp_path):
    _, off, _ = _run("npo_gd", bench, tmp_path / "off", diagnostics=0)
    assert "align_f" not in off or off["align_f"].isna().all()
    _, every2, _ = _run("npo_gd", bench, tmp_path / "k2", diagnostics=2, max_steps=4)
    assert every2["align_f"].notna().tolist() == [True, False, True, False]
    # with or without diagnostics the sum method takes the same steps (one vs two backward passes)
    m_off, _, _ = _run("npo_gd", bench, tmp_path / "off2", diagnostics=0)
    m_on, _, _ = _run("npo_gd", bench, tmp_path / "on2", diagnostics=1)
    for a, b in zip(m_off.parameters(), m_on.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_accumulation_equals_double_batch(bench):
    """2 micro-batches of 2 rows == 1 batch of 4 rows, for token-level (ce) and sequence-level (npo)."""
    model, tok = _fresh()
    params = list(model.parameters())
    rows = [0, 1, 2, 3]
    enc = lambda r, ds: engine._to(engine.encode_rows(tok, ds, r, max_length=128), "cpu")
    whole = [{"forget": enc(rows, bench.forget), "retain": enc(rows, bench.retain)}]
    halves = [{"forget": enc(rows[:2], bench.forget), "retain": enc(rows[2:], bench.retain)},
              {"forget": enc(rows[2:], bench.forget), "retain": enc(rows[:2], bench.retain)}]
    method, args = get_method("npo_gd")
    cfg = _cfg()
    ctx = engine.make_context(model, method, args, bench.forget, tok, cfg, None)
    for terms in (method.forget, method.retain):
        g1, l1 = accumulate(model, params, terms, whole, ctx, args)
        g2, l2 = accumulate(model, params, terms, halves, ctx, args)
        assert torch.allclose(l1, l2, atol=1e-6)
        assert float(geometry.norm(geometry.add(g1, g2, alpha=-1.0))) < 1e-6 * float(geometry.norm(g1))


# End-to-end comparisons use SGD: Adam's first steps are ~lr*sign(g) per coordinate, so rounding-level
# gradient differences (different padding / summation order) flip near-zero coordinates by 2*lr.
SGD = dict(optimizer="sgd", lr=0.5)


def test_accumulation_end_to_end(bench, tmp_path):
    m1, t1, _ = _run("pcgrad", bench, tmp_path / "a", micro_batch_size=None, **SGD)
    m2, t2, _ = _run("pcgrad", bench, tmp_path / "b", micro_batch_size=2, **SGD)
    m4, _, _ = _run("pcgrad", bench, tmp_path / "c", micro_batch_size=1, **SGD)
    m0, _ = _fresh()
    moved = sum(float((a - b).detach().abs().max()) for a, b in zip(m1.parameters(), m0.parameters()))
    assert moved > 1e-3   # the steps did change the model
    for a, b, c in zip(m1.parameters(), m2.parameters(), m4.parameters()):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert np.allclose(t1["loss_f"], t2["loss_f"], atol=1e-5)


def test_deterministic(bench, tmp_path):
    _, a, _ = _run("rlw", bench, tmp_path / "a")
    _, b, _ = _run("rlw", bench, tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)


def test_would_be_update_matches_adamw_and_leaves_state_alone():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    for _ in range(2):  # build some state
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    d = [torch.randn_like(p) for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    update = would_be_update(opt, params, d)
    assert all(torch.equal(state_before[k], opt.state[params[0]][k]) for k in state_before)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, d):
        p.grad = g
    opt.step()
    for b, p, u in zip(before, params, update):
        assert torch.allclose(b - p.detach(), 0.1 * u, atol=1e-6)


def test_autolr_recovers_the_quadratic_optimum_and_restores_parameters():
    a = 4.0
    target = torch.tensor([1.0, -2.0, 0.5])
    theta = [torch.nn.Parameter(torch.tensor([3.0, 1.0, 0.0]))]
    loss = lambda: 0.5 * a * ((theta[0] - target) ** 2).sum()
    D = [a * (theta[0].detach() - target)]          # the gradient as the update direction
    before = theta[0].detach().clone()
    out = autolr_probe(loss, theta, D, lr=0.01, loss_0=loss().detach())
    assert out["autolr_accepted"] == 1.0 and out["autolr_lr"] == pytest.approx(1 / a, rel=1e-4)
    assert torch.equal(theta[0].detach(), before)
    # concave along D: keep the old lr
    concave = lambda: -loss()
    out = autolr_probe(concave, theta, D, lr=0.01, loss_0=concave().detach())
    assert out["autolr_accepted"] == 0.0 and out["autolr_lr"] == 0.01


def test_divergence_stops_with_message(bench, tmp_path, monkeypatch):
    calls = {"n": 0}
    ga = OBJECTIVES["ga"]

    def exploding(model, batch, ctx):
        calls["n"] += 1
        out = ga.fn(model, batch, ctx)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setitem(OBJECTIVES, "ga", dataclasses.replace(ga, fn=exploding))
    with pytest.raises(engine.Diverged, match=r"step 2: non-finite ga@forget"):
        _run("ga", bench, tmp_path)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide"):
        UnlearnConfig(batch_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match="unknown method"):
        UnlearnConfig(method="nope")
    with pytest.raises(ValueError, match="schedule='cosine'; valid"):
        UnlearnConfig(schedule="cosine")


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("eval_limit", 0), ("micro_batch_size", 0),
                                         ("diagnostics", -1), ("eval_every", -1), ("epochs", 0),
                                         ("max_steps", 2.5), ("eval_limit", True)])
def test_out_of_range_fields_are_refused_by_the_python_api(field, value):
    """The CLI's ranges hold for UnlearnConfig too: a notebook or script gets the error before any work."""
    with pytest.raises(ValueError, match=rf"{field}={value!r}; valid: an int >= "):
        UnlearnConfig(**{field: value})
    UnlearnConfig(max_steps=None, eval_limit=None, diagnostics=0, eval_every=0)   # the documented "off" values stay valid


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, method):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from lab.data import tofu_subset
    bench = tofu_subset(n_retain_authors=2, n_forget_authors=1)
    model, tok = _fresh()
    m, args = get_method(method)
    unlearning_loop(model, tok, bench.forget, bench.retain, m, args, _cfg(method=method, **SGD),
                    progress=False, group=dist.group.WORLD)
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngdiff", "gru_npo_gd"])
def test_ddp_two_processes_match_single_process(method, bench, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), method), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    single, _, _ = _run(method, bench, tmp_path / "single", **SGD)
    start, _ = _fresh()
    # equal up to summation-order rounding: the difference is tiny next to how far the steps moved
    diff = sum(float((a.detach() - b).norm() ** 2) for a, b in zip(single.parameters(), ddp)) ** 0.5
    moved = sum(float((a.detach() - s.detach()).norm() ** 2)
                for a, s in zip(single.parameters(), start.parameters())) ** 0.5
    assert moved > 1e-2 and diff < 1e-4 * moved


# ---------------------------------------------------------------- issue 13 items 6, 7, 11
def test_retain_gradient_is_unweighted_whatever_the_retain_weight(bench, tmp_path):
    """METHODS §7 / BLUR eq. 8: g_r is the gradient of the UNWEIGHTED retain objective, so cos_fr,
    ||g_r|| (and loss_r) do not depend on lambda; the direction d = g_f + lambda g_r does, and A_r of
    it against the same g_r is <g_r,g_f>/||g_r||^2 + lambda: it moves by exactly the change of lambda
    (the lambda-scaled g_r of old gave A_r / lambda instead)."""
    rows = {}
    for w in (1.0, 3.0):
        _, trace, _ = _run("npo_gd", bench, tmp_path / str(w), max_steps=1, method_args={"retain_weight": w})
        rows[w] = trace.iloc[0]
    a, b = rows[1.0], rows[3.0]
    for col in ("cos_fr", "grad_norm_r", "grad_norm_f", "loss_r"):
        assert b[col] == pytest.approx(a[col], rel=1e-5, abs=1e-7), col
    assert b["align_r"] - a["align_r"] == pytest.approx(3.0 - 1.0, rel=1e-4)
    assert abs(b["norm_d"] - a["norm_d"]) > 1e-3 * a["norm_d"]      # d = g_f + lambda g_r changed
    assert abs(b["align_f"] - a["align_f"]) > 1e-4


def test_combine_reads_a_dynamic_retain_weight_from_the_combiner_state():
    from lab.methods import combine, direction_coefficients, retain_weight
    g_f, g_r = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]
    for name, expect in (("npo_gd", [1.0, 0.25]), ("blur_npo", [1.0, 0.25])):
        method, args = get_method(name)
        state = {"retain_weight": 0.25}
        assert retain_weight(method, args, state) == 0.25
        d, info = combine(method, args, g_f, g_r, {"loss_f": torch.tensor(1.0), "loss_r": torch.tensor(1.0)}, state)
        assert torch.allclose(d[0], torch.tensor(expect))
        a, b = direction_coefficients(method, args, info, state)
        assert torch.allclose(a * g_f[0] + b * g_r[0], d[0])


def test_diagnostics_describe_the_clipped_direction(bench, tmp_path):
    """METHODS §7: A_f, A_r and ||d|| of the direction handed to the optimizer, after clipping."""
    _, free, _ = _run("ga_rt", bench, tmp_path / "free", max_steps=1)
    _, clip, _ = _run("ga_rt", bench, tmp_path / "clip", max_steps=1, max_grad_norm=1e-3)
    f, c = free.iloc[0], clip.iloc[0]
    assert c["clip_scale"] < 0.5 and c["norm_d"] == pytest.approx(1e-3, rel=1e-4)
    for col in ("align_f", "align_r"):
        assert c[col] == pytest.approx(f[col] * c["clip_scale"], rel=1e-4), col
    assert c["grad_norm_r"] == pytest.approx(f["grad_norm_r"], rel=1e-6)


def test_would_be_update_of_sgd_includes_weight_decay():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.SGD(params, lr=0.1, weight_decay=0.3)
    d = [torch.randn_like(p) for p in params]
    update = would_be_update(opt, params, d)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, d):
        p.grad = g
    opt.step()
    for b, p, u in zip(before, params, update):
        assert torch.allclose(b - p.detach(), 0.1 * u, atol=1e-6)


def test_autolr_composes_with_the_schedule(bench, tmp_path):
    """The probed lr is the probed step's; later steps apply it times factor(t) / factor(probed step)."""
    total, warm = 5, 2
    _, trace, _ = _run("ngdiff_autolr", bench, tmp_path, max_steps=total, diagnostics=0, schedule="linear",
                       warmup_steps=warm, method_args={"autolr_every": 3})
    factor = lambda t: min(1.0, (t + 1) / warm) * (1 - t / total)   # noqa: E731
    probes = trace[trace["autolr_probe"] == 1.0]
    assert list(probes.index) == [0, 3]
    for t in range(total):
        p = max(i for i in probes.index if i <= t)
        assert trace["lr"].iloc[t] == pytest.approx(probes.loc[p, "autolr_lr"] * factor(t) / factor(p), rel=1e-6)
    assert trace["lr"].iloc[1] != pytest.approx(trace["lr"].iloc[2])   # the schedule still acts


def test_alignment_of_the_same_direction_ignores_the_retain_weight():
    """NGDiff normalises g_r, so d is the same for any lambda: A_f, A_r, cos_fr, ||g_r|| are too."""
    from lab.methods import combine, direction_coefficients
    torch.manual_seed(0)
    g_f, g_r = [torch.randn(7), torch.randn(3)], [torch.randn(7), torch.randn(3)]
    method, args = get_method("ngdiff")
    out = []
    for lam in (1.0, 4.0):
        state = {"retain_weight": lam}
        d, info = combine(method, args, g_f, g_r, {"loss_f": torch.tensor(1.0), "loss_r": torch.tensor(1.0)}, state)
        out.append(geometry.alignment(g_f, g_r, d, d_coef=direction_coefficients(method, args, info, state)))
    for k in out[0]:
        assert float(out[1][k]) == pytest.approx(float(out[0][k]), rel=1e-5), k


def test_initial_record_is_computed_on_the_rows_of_the_later_records(prepared_tiny, tmp_path):
    """Same rows (METHODS §6): with eval_limit the 'initial' record (from prepare's full evaluation) is
    cut to the evaluated rows, FQ / PrivLeak included, like every later record."""
    from lab.eval import restrict_eval
    res = engine.unlearn(method="ga", max_steps=1, eval_limit=5, runs_root=str(tmp_path), progress=False)
    rec = runs.load_run(res.run_dir)
    pairs = {c: g[["set", "row"]].reset_index(drop=True) for c, g in rec.rows.groupby("checkpoint")}
    assert len(pairs["initial"]) == 5 * 5 and pairs["initial"].equals(pairs["unlearned"])
    initial = rec.evals.set_index("checkpoint").loc["initial"]
    expected = restrict_eval(prepared_tiny.target_eval, 5, prepared_tiny.retain_eval)["metrics"]
    assert initial["forget_quality"] == pytest.approx(expected["forget_quality"])
    assert initial["forget_quality"] != pytest.approx(prepared_tiny.target_eval["metrics"]["forget_quality"])
    assert rec.config["score_eos"] is True          # the scoring convention is in config.yaml
    assert rec.config["conventions"] == {"score_eos": True, "forget_text_rows": None, "kl_form": None,
                                         "simnpo_margin": None, "pcgrad_form": None}   # TOFU's forget set is QA


@pytest.mark.parametrize("method,args,expected", [
    ("npo_gd", {}, {"score_eos": True, "kl_form": None, "simnpo_margin": None, "pcgrad_form": None}),
    ("npo_kl", {"kl_form": "reverse_answer"}, {"kl_form": "reverse_answer", "simnpo_margin": None}),
    ("simnpo", {}, {"simnpo_margin": "paper", "kl_form": None}),
    ("pcgrad", {}, {"pcgrad_form": "symmetric"}),
])
def test_every_config_records_the_conventions_block(method, args, expected):
    """config.yaml's `conventions`: score_eos and every METHODS option (None where the method has no term it
    changes), so a reader of any run sees which convention its numbers follow."""
    from lab.methods import CHOICES
    cfg = UnlearnConfig(method=method, method_args=args, score_eos=True)
    m, full_args = get_method(method, **args)
    block = engine.conventions(cfg, full_args)
    assert set(block) == {"score_eos", "forget_text_rows", *CHOICES}
    assert {k: block[k] for k in expected} == expected and block["forget_text_rows"] is None
    assert engine.conventions(dataclasses.replace(cfg, score_eos=False), full_args)["score_eos"] is False
    # a text forget set (MUSE): how its rows were cut; a QA one: None
    text = SimpleNamespace(forget=Dataset.from_dict({"text": ["an article"]}))
    qa = SimpleNamespace(forget=Dataset.from_dict({"question": ["q"], "answer": ["a"]}))
    assert engine.conventions(cfg, full_args, text)["forget_text_rows"] == "chunks"
    assert engine.conventions(dataclasses.replace(cfg, forget_text_rows="truncated"), full_args, text)[
        "forget_text_rows"] == "truncated"
    assert engine.conventions(cfg, full_args, qa)["forget_text_rows"] is None
    with pytest.raises(ValueError, match="forget_text_rows='articles'; valid: chunks, truncated"):
        UnlearnConfig(method=method, forget_text_rows="articles")


def test_unlearn_config_records_eval_metric_options_with_defaults():
    from lab.engine import UnlearnConfig
    cfg = UnlearnConfig(method="ga", eval_options={"privleak_score": "min_k_plus_plus"})
    assert cfg.eval_options["privleak_score"] == "min_k_plus_plus"
    assert cfg.eval_options["truth_ratio_aggregators"]["forget"] == "closer_to_1_better"
    assert cfg.eval_options["mia_gradnorm"] is True and cfg.eval_options["es_no_match"] == "zero"
    with pytest.raises(ValueError, match="privleak_score='minkpp'; valid: loss, min_k"):
        UnlearnConfig(method="ga", eval_options={"privleak_score": "minkpp"})
    with pytest.raises(ValueError, match="unknown evaluation options \\['gradnorm'\\]; valid: truth_ratio_aggregators"):
        UnlearnConfig(method="ga", eval_options={"gradnorm": False})
