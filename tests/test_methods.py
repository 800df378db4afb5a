import pytest
import torch

from lab import geometry as G
from lab.methods import (METHODS, combine, direction_coefficients, fit_to_model, get_method, list_methods,
                         normalise_name)

ISSUE_NAMES = [  # every method the engine issue names, spelled as the papers do
    "GA", "GA+RT", "GA+KL", "GradDiff", "gdiff(0.1)", "gdiff(0.5)", "gdiff(0.9)", "NPO", "NPO+RT", "NPO+GD",
    "NPO+KL", "SimNPO", "SimNPO+GD", "WGA", "DPO+RT", "IdK", "LossNorm", "RLW", "PCGrad", "IMTL-G",
    "NGDiff", "NGDiff+AutoLR", "GRU-GA", "GRU-WGA", "GRU-NPO", "GRU-GD", "GRU-NPO+KL", "GRU-NPO+GD",
    "GRU-SimNPO+GD", "BLUR-NPO", "BLUR-GA", "BLUR-SimNPO", "BLUR-RMU", "RMU",
    # issue 16: open-unlearning's methods, their retain variants, GRU / BLUR over them
    "UNDIAL", "UNDIAL+RT", "UNDIAL+GD", "CE-U", "CEU", "SatImp", "SatImp+RT", "PDU", "GRU-UNDIAL", "GRU-UNDIAL+GD",
    "GRU-CEU", "GRU-SatImp", "GRU-SatImp+GD", "BLUR-UNDIAL", "BLUR-CEU", "BLUR-SatImp",
]


@pytest.mark.parametrize("name", ISSUE_NAMES)
def test_every_paper_name_resolves(name):
    method, args = get_method(name)
    assert method is METHODS[method.name]


def test_aliases_and_gdiff_c():
    assert get_method("NPO+RT")[0] is get_method("npo_gd")[0]
    assert get_method("GradDiff")[0] is get_method("ga_rt")[0]
    assert get_method("gdiff(0.1)")[1]["c"] == 0.1
    assert normalise_name(" GRU-NPO+GD ") == "gru_npo_gd"


def test_pieces_follow_methods_md():
    gru_gd, args = get_method("gru_gd")
    assert gru_gd.combiner == "gru" and args["retain_in_update"] and args["gamma"] == 0.8
    gru_npo_kl, args = get_method("gru_npo_kl")
    assert [t.objective for t in gru_npo_kl.forget] == ["npo", "kl"] and not args["retain_in_update"]
    assert [t.objective for t in gru_npo_kl.retain] == ["ce"]
    blur, args = get_method("blur_npo")
    assert blur.combiner == "blur" and args == {"beta": 0.1, "gamma": 1.0}
    assert get_method("ngdiff_autolr")[0].autolr and not get_method("ngdiff")[0].autolr
    assert not get_method("npo_kl")[0].separate_gradients and get_method("pcgrad")[0].separate_gradients


def test_autolr_suffix_adds_autolr_to_any_method():
    ln, args = get_method("LossNorm+AutoLR")
    assert ln.autolr and ln.name == "lossnorm_autolr" and ln.combiner == "lossnorm"
    assert args == {"autolr_every": 10, "autolr_max_factor": None}
    gd, args = get_method("gdiff(0.9)+autolr", autolr_every=5)
    assert gd.autolr and args["c"] == 0.9 and args["autolr_every"] == 5
    npo, args = get_method("npo+autolr")
    assert npo.autolr and npo.forget == get_method("npo")[0].forget and not npo.retain and args["beta"] == 0.1
    assert get_method("ngdiff+autolr")[0] is get_method("ngdiff_autolr")[0]   # the registered one
    with pytest.raises(ValueError, match="already has AutoLR"):
        get_method("ngdiff_autolr+autolr")
    with pytest.raises(ValueError, match="'\\+autolr' suffix"):
        get_method("npoo+autolr")


def test_bad_names_and_options_list_what_is_valid():
    with pytest.raises(ValueError, match="valid: .*blur_npo"):
        get_method("blurr")
    with pytest.raises(ValueError, match=r"unknown options \['gama'\]; valid: \['beta', 'gamma'\]"):
        get_method("blur_npo", gama=2)
    with pytest.raises(ValueError, match=r"c=1.5 must lie in \[0, 1\]"):
        get_method("gdiff", c=1.5)


def test_list_methods_one_row_per_method():
    df = list_methods()
    assert df["method"].is_unique and {"ga_rt", "gru_simnpo_gd", "blur_rmu"} <= set(df["method"])
    assert "graddiff" in df.set_index("method").loc["ga_rt", "aliases"]


COMBINER_CASES = [(n, {}) for n in sorted({m.combiner: n for n, m in METHODS.items()}.values())]
COMBINER_CASES += [("pcgrad", {"pcgrad_form": "ngdiff"})]


@pytest.mark.parametrize("name, overrides", COMBINER_CASES)
@pytest.mark.parametrize("case", ["random", "zero_f", "zero_r", "opposite"])
def test_direction_coefficients_reconstruct_d_and_give_the_measured_alignment(name, overrides, case):
    # the engine's shortcut (lab.engine._step): alignment from (a, b) must equal alignment measured on d
    method, args = get_method(name, **overrides)
    gen = torch.Generator().manual_seed(len(name))
    shapes = [(3, 4), (5,), (2, 2, 2)]
    g_f = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    g_r = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if case == "zero_f":
        g_f = [torch.zeros_like(t) for t in g_f]
    elif case == "zero_r":
        g_r = [torch.zeros_like(t) for t in g_r]
    elif case == "opposite":
        g_r = [-t for t in g_f]
    losses = {"loss_f": torch.tensor(2.0, dtype=torch.float64), "loss_r": torch.tensor(0.5, dtype=torch.float64)}
    d, info = combine(method, args, g_f, g_r, losses, {}, generator=torch.Generator().manual_seed(0))
    coef = direction_coefficients(method, args, info)
    if method.combiner == "gru" or (method.combiner == "pcgrad" and args["pcgrad_form"] == "symmetric"):
        assert coef is None
        return
    a, b = (float(c) for c in coef)
    rebuilt = G.add(G.scale(g_f, a), g_r, alpha=b)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(rebuilt, d)), (name, case)
    measured, derived = G.alignment(g_f, g_r, d), G.alignment(g_f, g_r, d, d_coef=coef)
    assert derived.keys() == measured.keys()
    for key in measured:
        assert float(derived[key]) == pytest.approx(float(measured[key]), rel=1e-9, abs=1e-9), (name, case, key)


# options METHODS.md names: (option, the objective or combiner that reads it, default, other value)
OPTIONS = [("kl_form", "kl", "forward", "reverse_answer"), ("simnpo_margin", "simnpo", "paper", "authors"),
           ("pcgrad_form", "pcgrad", "symmetric", "ngdiff")]


@pytest.mark.parametrize("option, user, default, other", OPTIONS)
def test_every_method_using_an_option_has_its_default_so_configs_record_it(option, user, default, other):
    users = {m.name for m in METHODS.values()
             if user in {t.objective for t in (*m.forget, *m.retain)} or m.combiner == user}
    assert users, option
    for name in users:
        method, args = get_method(name)
        assert args[option] == default, name
        assert get_method(name, **{option: other})[1][option] == other
        with pytest.raises(ValueError, match=f"{option}='nope'; valid: {default}, {other}"):
            get_method(name, **{option: "nope"})
    # and no other method accepts it (an option that does nothing is an error, as any unknown option)
    other_method = next(n for n in ("ga", "npo_gd") if n not in users)
    with pytest.raises(ValueError, match=f"unknown options \\['{option}'\\]"):
        get_method(other_method, **{option: default})


def test_pcgrad_ngdiff_form_through_combine():
    f = [torch.tensor([1.0, 1.0]), torch.tensor([[0.0]])]
    r = [torch.tensor([-2.0, 0.0]), torch.tensor([[2.0]])]
    method, args = get_method("pcgrad", pcgrad_form="ngdiff")
    d, info = combine(method, args, f, r, {}, {})
    assert torch.allclose(torch.cat([t.reshape(-1) for t in d]), torch.tensor([-6 / 9, 4 / 9, 10 / 9]))
    assert direction_coefficients(method, args, info) == pytest.approx((4 / 9, 5 / 9))
    sym, sym_args = get_method("pcgrad")
    d_sym, _ = combine(sym, sym_args, f, r, {}, {})
    assert torch.allclose(torch.cat([t.reshape(-1) for t in d_sym]), torch.tensor([-0.5, 2.0, 2.5]))


def test_new_methods_pieces():
    undial, args = get_method("undial_rt")
    assert [t.objective for t in undial.forget] == ["undial"] and args == {"beta": 10.0, "retain_weight": 1.0}
    satimp, args = get_method("SatImp+RT")
    assert args == {"beta1": 5.0, "beta2": 1.0, "retain_weight": 0.1}      # alpha 0.1 as open-unlearning
    assert get_method("gru_satimp_gd")[1]["retain_weight"] == 0.1
    assert get_method("ceu")[0].retain == () and get_method("ce-u")[0] is get_method("ceu")[0]
    assert get_method("blur_satimp")[0].combiner == "blur" and get_method("gru_undial")[0].combiner == "gru"
    df = list_methods().set_index("method")
    assert {"undial", "undial_gd", "ceu", "satimp", "satimp_gd"} <= set(df.index)
    assert all(df.loc[m, "source"] for m in ("undial", "ceu", "satimp"))


def test_pdu_combiner_dual_ascent_by_hand():
    """d = g_f + lambda_t g_r; lambda_{t+1} = max(0, lambda_t + eta (L_r - eps)) kept in the combiner state."""
    method, args = get_method("pdu", dual_init=2.0, retain_eps=0.5, dual_step=0.1)
    f = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]])]
    r = [torch.tensor([0.5, -1.0]), torch.tensor([[1.0]])]
    flat = lambda g: torch.cat([t.reshape(-1) for t in g])
    state = {}
    expected = [(torch.tensor(1.5), 2.0), (torch.tensor(0.1), 2.1), (torch.tensor(0.0), 2.06)]
    for loss_r, lam in expected:
        d, info = combine(method, args, f, r, {"loss_f": torch.tensor(1.0), "loss_r": loss_r}, state)
        assert float(info["dual_retain_weight"]) == pytest.approx(lam)
        assert torch.allclose(flat(d), flat(f) + lam * flat(r))
        a, b = direction_coefficients(method, args, info, state)     # the lambda d used, not the next one
        assert (float(a), float(b)) == pytest.approx((1.0, lam))
    assert float(state["retain_weight"]) == pytest.approx(2.06 + 0.1 * (0.0 - 0.5))
    big = get_method("pdu", dual_init=1.0, retain_eps=0.5, dual_step=10.0)
    state = {}
    combine(*big, f, r, {"loss_f": torch.tensor(1.0), "loss_r": torch.tensor(0.0)}, state)
    assert float(state["retain_weight"]) == 0.0                        # projected onto lambda >= 0


@pytest.fixture(scope="module")
def small_bench():
    from lab.data import tofu_subset
    return tofu_subset(n_retain_authors=2, n_forget_authors=1)


def test_pdu_dual_weight_in_the_trace_every_step_and_kept_across_loop_calls(small_bench):
    """The dual weight is combiner state (LoopState.combiner_state): traced every step, diagnostics or
    not, following the dual ascent on the traced retain loss; a loop continued with the same LoopState
    goes on from the dual it reached (no reset to dual_init)."""
    import pandas as pd

    from lab.engine import LoopState, UnlearnConfig, unlearning_loop
    from lab.models import load_model
    model, tok = load_model("tiny", seed=0)
    method, args = get_method("pdu", dual_init=1.0, retain_eps=5.0, dual_step=0.5)
    cfg = UnlearnConfig(method="pdu", model="tiny", lr=1e-3, batch_size=4, max_steps=3, max_length=128,
                        diagnostics=0, method_args={"dual_init": 1.0, "retain_eps": 5.0, "dual_step": 0.5})
    state = LoopState()
    unlearning_loop(model, tok, small_bench.forget, small_bench.retain, method, args, cfg, progress=False,
                    state=state)
    unlearning_loop(model, tok, small_bench.forget, small_bench.retain, method, args, cfg, progress=False,
                    state=state)
    trace = pd.DataFrame(state.trace)
    assert len(trace) == 6 and trace["dual_retain_weight"].notna().all()
    lam, loss_r = trace["dual_retain_weight"].to_numpy(), trace["loss_r"].to_numpy()
    assert lam[0] == 1.0
    for t in range(5):   # across the two calls too
        assert lam[t + 1] == pytest.approx(max(0.0, lam[t] + 0.5 * (loss_r[t] - 5.0)), rel=1e-5)
    assert float(state.combiner_state["retain_weight"]) == pytest.approx(
        max(0.0, lam[5] + 0.5 * (loss_r[5] - 5.0)), rel=1e-5)


# ---------------------------------------------------------------- end to end on the tiny preset
E2E = ["undial_gd", "ceu", "satimp_gd", "pdu", "gru_undial", "blur_satimp", "npo_kl", "rmu"]


@pytest.mark.parametrize("name", E2E)
def test_methods_run_end_to_end_and_the_config_records_their_options(name, prepared_tiny, tmp_path):
    """issue 16's methods (and GRU / BLUR over them) from `unlearn` on the prepared tiny target; the
    saved config has every option default (kl_form, simnpo_margin, pcgrad_form) though none was passed."""
    from lab import runs
    from lab.engine import unlearn
    res = unlearn(method=name, model="tiny", benchmark="tofu_subset", max_steps=2, eval_limit=2, batch_size=4,
                  max_length=128, eval_batch_size=8, runs_root=str(tmp_path), progress=False)
    rec = runs.load_run(res.run_dir)
    assert rec.status == "done" and len(res.trace) == 2
    assert res.trace[["loss_f", "loss_r", "grad_norm_f", "grad_norm_r", "align_f", "align_r"]].notna().all().all()
    assert "forget_rouge" in res.metrics
    method, args = get_method(name)
    saved = rec.config["method_args"]
    assert saved == fit_to_model(method, args, res.model)       # RMU: the layers used, not None
    if name == "rmu":
        assert (saved["rmu_layer"], saved["rmu_layers"]) == (2, [0, 1, 2])   # 4-layer tiny preset
    for option, _, default, _ in OPTIONS:
        if option in args:
            assert saved[option] == default
    if name == "npo_kl":
        assert saved["kl_form"] == "forward"
    if name == "pdu":
        assert res.trace["dual_retain_weight"].iloc[0] == args["dual_init"]


@pytest.mark.slow
def test_pdu_dual_weight_on_resume_of_a_continual_run(prepared_tiny, tmp_path, crashing_task):
    """Continual runs resume after their last finished task, and every task starts a fresh LoopState
    (combiner state: GRU's EMA, PDU's dual weight, from dual_init): a run resumed after a crash in task 1
    traces the same dual_retain_weight at every step as the uninterrupted run."""
    from lab import continual as C
    from lab import runs
    kw = dict(method="pdu", protocol="sequential", lr=1e-3, n_tasks=2, task_unit="rows", epochs=1, batch_size=8,
              max_length=128, eval_limit=2, eval_max_new_tokens=16, eval_batch_size=8, progress=False)
    full = C.continual(runs_root=tmp_path / "a", **kw)
    crashing_task(lambda: C.continual(runs_root=tmp_path / "b", **kw))
    resumed = C.continual(resume=runs.find_runs(tmp_path / "b")[0], progress=False)
    a, b = runs.load_run(full.run_dir).trace, runs.load_run(resumed.run_dir).trace
    assert len(a) == len(b) > 2 and a["dual_retain_weight"].notna().all()
    assert list(b["dual_retain_weight"]) == pytest.approx(list(a["dual_retain_weight"]), rel=1e-6)
    assert (a.groupby("task")["dual_retain_weight"].first() == 1.0).all()
    assert a["dual_retain_weight"].nunique() > 1          # the dual moved within a task
