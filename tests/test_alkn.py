"""lab.alkn: ESL weights and objective, DGS score/mask against hand computations, update masking under
AdamW (unit and through the engine loop), APM step sizes, the lean G_r sketch, quantiles, T-Rouge."""
import math

import pytest
import torch

from lab import alkn, taskvec
from lab.engine import UnlearnConfig, encode_rows, make_context
from lab.methods import get_method
from lab.objectives import ObjectiveContext, _forward, answer_token_logprobs


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_esl_weights_hand_values():
    p = torch.tensor([1.0, 0.9, 0.5, 0.0])
    paper = alkn.esl_weights(p)          # sigmoid(10 (p - 1))
    assert paper.tolist() == pytest.approx([0.5, _sig(-1.0), _sig(-5.0), _sig(-10.0)], rel=1e-6)
    assert paper.tolist() == pytest.approx([0.5, 0.2689414, 0.0066929, 4.5398e-05], rel=1e-4)
    assert alkn.esl_weights(p, s=2.0)[1].item() == pytest.approx(_sig(-0.2), rel=1e-6)
    official = alkn.esl_weights(torch.tensor([1.0, 0.8, 0.0]), form="official")   # k = 1.5
    assert official.tolist() == pytest.approx([_sig(0.3) - _sig(-1.2), 0.5 - _sig(-1.2), 0.0], abs=1e-6)
    assert official[0].item() == pytest.approx(0.342968, abs=1e-5)
    with pytest.raises(ValueError, match="valid: 'paper', 'official'"):
        alkn.esl_weights(p, form="soft")


@pytest.fixture(scope="module")
def tiny():
    from lab.data import tofu_subset
    from lab.models import load_model
    bench = tofu_subset(n_retain_authors=1, n_forget_authors=1)
    model, tok = load_model("tiny", seed=0)
    return model, tok, bench


def test_esl_objective_gathers_reference_tokens_by_row(tiny):
    model, tok, bench = tiny
    rows = [2, 0]                                        # out of order: weights must follow batch["index"]
    batch = encode_rows(tok, bench.forget, rows, max_length=96)
    n_tok = int((batch["labels"][:, 1:] != -100).sum(1).max())
    ref = torch.zeros(4, n_tok)
    for r in range(4):                                   # distinctive p0 per (row, token)
        ref[r] = torch.log(torch.linspace(0.05, 0.95, n_tok).roll(r))
    ctx = ObjectiveContext(args={"esl_s": 10.0, "esl_form": "paper"}, ref_logprob={"answer_tokens": ref})
    got = alkn.esl_loss(model, batch, ctx)
    with torch.no_grad():
        logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    expected = 0.0
    for i, r in enumerate(rows):
        for j, lp in enumerate(logp[i][mask[i]]):
            expected -= alkn.esl_weights(ref[r, j].exp()).item() * lp.item()
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the engine precomputes p0 at the starting weights: then w = sigmoid(10 (p - 1)) of the model's own p
    cfg = UnlearnConfig(method="finetune_esl", max_length=96, eval_batch_size=8)
    m, args = get_method("finetune_esl")
    ctx = make_context(model, m, args, bench.forget, tok, cfg, None)
    own = -(alkn.esl_weights(logp.exp()) * logp * mask).sum()
    assert alkn.esl_loss(model, batch, ctx).item() == pytest.approx(own.item(), rel=1e-4)


def test_alkn_options_and_ablations():
    assert alkn.alkn_options("ALKN")["lam"] == 0.8 and alkn.alkn_options("alkn")["esl_s"] == 10.0
    assert alkn.alkn_options("alkn w/o ESL".replace(" w/o ", "_wo_"))["esl"] is False
    assert alkn.alkn_options("alkn_wo_dgs")["dgs"] is False and alkn.alkn_options("alkn_wo_apm")["apm"] == "off"
    tv = alkn.alkn_options("tv")
    assert not tv["esl"] and not tv["dgs"] and tv["apm"] == "off"
    with pytest.raises(ValueError, match="mask_alignment='sideways'; valid: \\['agree', 'oppose'\\]"):
        alkn.alkn_options("alkn", mask_alignment="sideways")
    with pytest.raises(ValueError, match="unknown options \\['lamda'\\]"):
        alkn.alkn_options("alkn", lamda=0.5)
    with pytest.raises(ValueError, match="unknown ALKN variant"):
        alkn.alkn_options("alkn_wo_everything")


# ---------------------------------------------------------------- DGS by hand
def _params():
    return [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]


G_R = [torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5, -1.0])]
PREV = [torch.tensor([False, True]), torch.tensor([False, False, True])]
G_U = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])]


def _hooks(params, total=3, retain=None, prev=PREV, **kw):
    opts = alkn.alkn_options("alkn", **{"apm": "off", **kw})
    return alkn.ALKNHooks(params, opts, total, alkn.RetainGradient(retain or G_R), prev)


def test_dgs_score_and_mask_against_hand_computation():
    params = _params()
    h = _hooks(params)
    # step 0: rho = 1 -> everything active; then m += 0.8 G_u*G_r - mu M with
    # G_u*G_r = [1, -1, 2, 1, -1], mu = 0.5 * std = 0.5 * sqrt(1.6 - 0.4^2) = 0.6
    d = h.on_direction(0, params, G_U, [], G_U)
    assert all(torch.equal(a, b) for a, b in zip(d, G_U))
    assert h.extras["active_fraction"] == 1.0 and h.extras["dgs_mu"] == pytest.approx(0.6)
    m = torch.cat(h.m).tolist()
    assert m == pytest.approx([0.8, -0.8 - 0.6, 1.6, 0.8, -0.8 - 0.6])
    # step 1: rho = 1 + (0.3 - 1) * 1/2 = 0.65 -> round(0.65 * 5) = 3 kept: the 3rd largest m is 0.8
    d = h.on_direction(1, params, G_U, [], G_U)
    assert h.extras["dgs_rho"] == pytest.approx(0.65) and h.extras["dgs_eta"] == pytest.approx(0.8)
    assert [x.tolist() for x in h.mask] == [[True, False], [True, True, False]]
    assert [x.tolist() for x in d] == [[1.0, 0.0], [1.0, 2.0, 0.0]]             # ALKN eq. 7
    assert torch.cat(h.m).tolist() == pytest.approx([1.6, -2.8, 3.2, 1.6, -2.8])
    # final mask at rho_end = 0.3: round(1.5) = 2 kept -> eta = 1.6 (a tie: 3 entries reach it)
    assert [x.tolist() for x in h.final_mask()] == [[True, False], [True, True, False]]


def test_dgs_oppose_flips_the_sign_and_fixed_mu():
    params = _params()
    h = _hooks(params, mask_alignment="oppose", dgs_mu=1.0)
    h.on_direction(0, params, G_U, [], G_U)
    assert torch.cat(h.m).tolist() == pytest.approx([-0.8, 0.8 - 1.0, -1.6, -0.8, 0.8 - 1.0])
    h = _hooks(params, prev=None)                     # first task: no M, no mu term
    h.on_direction(0, params, G_U, [], G_U)
    assert torch.cat(h.m).tolist() == pytest.approx([0.8, -0.8, 1.6, 0.8, -0.8])


def _engine_like_step(hooks, params, opt, grads, k):
    """What lab.engine._step does around the optimizer: on_direction, step, on_update(before)."""
    before = [p.detach().clone() for p in params]
    d = hooks.on_direction(k, params, grads, [], grads) if hooks.on_direction else grads
    for p, g in zip(params, d):
        p.grad = g.clone()
    opt.step()
    if hooks.on_update:
        hooks.on_update(k, params, before)
    return before


@pytest.mark.parametrize("target", ["update", "grad"])
def test_masked_coordinates_do_not_move_under_adamw_with_update_masking(target):
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 2.0, 0.5]))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    opts = alkn.alkn_options("alkn", apm="off", rho_end=0.5, dgs_mu=0.0, mask_target=target)
    h = alkn.ALKNHooks([p], opts, 2, alkn.RetainGradient([torch.ones(4)]), None)
    hooks = h.step_hooks()
    _engine_like_step(hooks, [p], opt, [torch.tensor([1.0, 2.0, 3.0, 4.0])], 0)   # all active: momentum builds
    before = _engine_like_step(hooks, [p], opt, [torch.tensor([1.0, 1.0, 1.0, 1.0])], 1)
    assert h.mask[0].tolist() == [False, False, True, True]                         # top half of m
    moved = (p.detach() != before[0]).tolist()
    if target == "update":
        assert moved == [False, False, True, True]           # masked coordinates exactly unchanged
    else:  # released code: only the gradient is masked; momentum and weight decay still move them
        assert moved == [True, True, True, True]


def test_update_masking_through_the_engine_loop(tiny):
    model, tok, bench = tiny
    params = taskvec.trainable(model)
    theta = taskvec.snapshot(params)
    cfg = UnlearnConfig(method="finetune_esl", lr=1e-3, batch_size=4, max_steps=3, max_length=96,
                        eval_batch_size=8, weight_decay=0.1)
    opts = alkn.alkn_options("alkn", rho_end=0.3, apm="off")
    gr = alkn.retain_gradient(model, tok, bench.retain, cfg, opts)
    hooks = alkn.ALKNHooks(params, opts, 3, gr, None)
    seen = []
    inner = hooks.on_update

    def on_update(step, ps, before):
        inner(step, ps, before)
        moved = [p.detach() != b for p, b in zip(ps, before)]
        seen.append(all(not (mv & ~mk).any() for mv, mk in zip(moved, hooks.mask)))
        seen.append(sum(int(mv.sum()) for mv in moved) / sum(mv.numel() for mv in moved))
    sh = hooks.step_hooks()
    sh.on_update = on_update
    taskvec.finetune(model, tok, bench.forget, cfg, method="finetune_esl", hooks=sh)
    assert seen[0::2] == [True, True, True]                  # nothing outside the step's mask moved
    assert seen[-1] <= 0.3 + 0.01                            # last step: ~rho_end of the entries at most
    taskvec.load_values_(params, theta)


# ---------------------------------------------------------------- APM
def test_apm_step_sizes_per_element():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=0.1, eps=1e-12, weight_decay=0.0)
    prev = [torch.tensor([True, False, True, False])]
    opts = alkn.alkn_options("alkn_wo_dgs", apm="element", apm_low=0.1)
    h = alkn.ALKNHooks([p], opts, 1, None, prev)
    # first Adam step = -lr * sign(g); APM scales it to alpha_l = 0.1 lr on M (ALKN eq. 10)
    _engine_like_step(h.step_hooks(), [p], opt, [torch.tensor([1.0, -2.0, 3.0, -4.0])], 0)
    assert p.detach().tolist() == pytest.approx([-0.01, 0.1, -0.01, 0.1], rel=1e-5)


def test_apm_per_tensor_released_code():
    ps = [torch.nn.Parameter(torch.zeros(5)) for _ in range(3)]
    opt = torch.optim.AdamW(ps, lr=0.1, eps=1e-12, weight_decay=0.0)
    prev = [torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool), torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool),
            torch.zeros(5, dtype=torch.bool)]
    h = alkn.ALKNHooks(ps, alkn.alkn_options("alkn_wo_dgs", apm="per_tensor"), 1, None, prev)
    assert h.tensor_scale == [0.1, 0.1, 1.0]     # denser half (ceil(3/2) = 2 tensors with density > 0)
    _engine_like_step(h.step_hooks(), ps, opt, [torch.ones(5)] * 3, 0)
    assert [p.detach().abs().max().item() for p in ps] == pytest.approx([0.01, 0.01, 0.1], rel=1e-5)


def test_no_previous_mask_means_no_apm_and_no_hooks():
    h = alkn.ALKNHooks([torch.nn.Parameter(torch.zeros(2))], alkn.alkn_options("alkn_wo_dgs"), 1, None, None)
    assert h.step_hooks() is None


# ---------------------------------------------------------------- G_r sketch and quantiles
def test_lean_retain_gradient_eq56():
    g = [torch.tensor([0.1, -5.0, 3.0, 0.01])]
    rg = alkn.RetainGradient(g, lean=True, top=0.5, a=10.0)
    assert rg.signs[0].tolist() == [0, -1, 1, 0] and rg.signs[0].dtype == torch.int8
    assert rg.product([torch.tensor([1.0, 2.0, 3.0, 4.0])])[0].tolist() == [1.0, -20.0, 30.0, 4.0]
    assert math.isnan(rg.dot([torch.ones(4)]))
    full = alkn.RetainGradient(g)
    assert full.dot([torch.ones(4)]) == pytest.approx(0.1 - 5 + 3 + 0.01)


def test_quantile_exact_and_estimate():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(100_000, generator=g) * torch.randn(100_000, generator=g),   # heavy tails
              torch.randn(300, 700, generator=g).pow(3)]
    n = sum(s.numel() for s in scores)
    for rho in (0.9, 0.5, 0.3, 0.05):
        exact = alkn.score_threshold(scores, rho, "exact")
        assert sum(int((s >= exact).sum()) for s in scores) == round(rho * n)
        est = alkn.score_threshold(scores, rho, "estimate")
        assert abs(sum(int((s >= est).sum()) for s in scores) / n - rho) < 2e-3
    assert alkn.score_threshold(scores, 1.0) == -math.inf
    with pytest.raises(ValueError, match="quantile='median'"):
        alkn.score_threshold(scores, 0.5, "median")


# ---------------------------------------------------------------- a whole ALKN task
def test_alkn_task_negates_and_returns_a_mask(tiny):
    model, tok, bench = tiny
    params = taskvec.trainable(model)
    theta = taskvec.snapshot(params)
    cfg = UnlearnConfig(method="finetune_esl", lr=1e-3, batch_size=4, max_steps=2, max_length=96, eval_batch_size=8)
    out = alkn.alkn_task(model, tok, bench.forget, bench.retain, cfg, alkn.alkn_options("alkn", lam=0.5))
    assert [r["active_fraction"] for r in out["state"].trace] == pytest.approx([1.0, 0.3], abs=0.02)
    assert abs(sum(int(m.sum()) for m in out["mask"]) / sum(m.numel() for m in out["mask"]) - 0.3) < 0.05
    taskvec.load_values_(params, theta)
    tau = taskvec.task_vector(model, tok, bench.forget, cfg, method="finetune_esl",
                              hooks=alkn.ALKNHooks(params, alkn.alkn_options("alkn", lam=0.5), 2,
                                                   alkn.retain_gradient(model, tok, bench.retain, cfg), None)
                              .step_hooks())
    out2 = alkn.alkn_task(model, tok, bench.forget, bench.retain, cfg, alkn.alkn_options("alkn", lam=0.5))
    # theta^t = theta - lam * tau (same seed, same hooks: the same fine-tuning)
    assert all(torch.allclose(p, t - 0.5 * d, atol=1e-6) for p, t, d in zip(params, theta, tau))
    assert all(torch.equal(a, b) for a, b in zip(out["mask"], out2["mask"]))
    taskvec.load_values_(params, theta)


# ---------------------------------------------------------------- T-Rouge
def test_trouge_corpus_build_cache_split_and_mu(tiny, tmp_path, monkeypatch):
    model, tok, bench = tiny
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    prefixes = list(bench.retain["answer"][:10])
    kw = dict(n_generate=8, top_n=3, prefix_texts=prefixes, max_new_tokens=24, min_words=3, batch_size=8)
    corpus = alkn.build_trouge_corpus(model, tok, **kw)
    assert 1 <= len(corpus) <= 3 and len(list((tmp_path / "trouge").glob("*.json"))) == 1
    assert [r["ppl"] for r in corpus] == sorted(r["ppl"] for r in corpus)      # most likely first
    for r in corpus:
        n = len(r["text"].split())
        assert len(r["prompt"].split()) == math.ceil(0.7 * n) and r["prompt"] + " " + r["target"] == r["text"]
    monkeypatch.setattr(model, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    assert alkn.build_trouge_corpus(model, tok, **kw) == corpus                 # from the cache
    monkeypatch.undo()
    value = alkn.trouge(model, tok, corpus, max_new_tokens=8)["trouge"]
    assert 0.0 <= value <= 1.0
    metrics = {k: 0.5 for k in alkn.UTILITY_KEYS}
    assert alkn.utility_with_trouge(metrics, 0.25) == pytest.approx(10 / (9 * 2 + 4))
    with pytest.raises(ValueError, match="metrics lack"):
        alkn.utility_with_trouge({}, 0.5)


# ---------------------------------------------------------------- DGS / APM on shards (issue 17, fsdp)
# tensors cut along dim 0 as FSDP2 cuts them (torch.chunk; the (1, 4) and (1,) tensors leave rank 1 empty)
SHARD_SHAPES = [(64, 32), (7, 3), (5,), (1, 4), (1,)]
SHARD_RHOS = (0.9, 0.5, 0.3, 0.05)


def _shard(tensors, rank, world):
    out = []
    for t in tensors:
        chunks = torch.chunk(t, world, 0)
        out.append(chunks[rank] if rank < len(chunks) else t[0:0])
    return out


def _shard_inputs():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(100_000, generator=g) * torch.randn(100_000, generator=g),
              torch.randn(300, 7, generator=g).pow(3), torch.randn(1, generator=g)]
    g_r = [torch.randn(s, generator=g) for s in SHARD_SHAPES]
    # previous-mask densities 0.5, 0.2, 0.8, 1, 0 per tensor: per_tensor APM ranks them
    prev = [torch.rand(s, generator=g) < p for s, p in zip(SHARD_SHAPES, (0.5, 0.2, 0.8, 1.0, 0.0))]
    g_u = [[torch.randn(s, generator=g) for s in SHARD_SHAPES] for _ in range(3)]
    return scores, g_r, prev, g_u


def _shard_job(group, rank, world):
    """Thresholds, the lean G_r sketch and three DGS steps + the final mask with per_tensor APM, on this
    rank's shards; group None: one process on the whole tensors."""
    scores, g_r, prev, g_u = (_shard(x, rank, world) if i < 3 else [_shard(s, rank, world) for s in x]
                              for i, x in enumerate(_shard_inputs()))
    out = {"eta": {(rho, m): alkn.score_threshold(scores, rho, m, group)
                   for rho in SHARD_RHOS for m in ("exact", "estimate")},
           "signs": alkn.RetainGradient(g_r, lean=True, top=0.1, group=group).signs}
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in g_r]
    opts = alkn.alkn_options("alkn", apm="per_tensor", rho_end=0.3)
    h = alkn.ALKNHooks(params, opts, 3, alkn.RetainGradient(g_r), prev, group=group)
    out["tensor_scale"], out["steps"] = h.tensor_scale, []
    for k, g in enumerate(g_u):
        d = h.on_direction(k, params, g, [], g)
        out["steps"].append({"extras": dict(h.extras), "mask": [m.clone() for m in h.mask], "d": d,
                             "m": [m.clone() for m in h.m]})
    out["final_mask"] = h.final_mask()
    out["shards"] = h.step_hooks().shards
    return out


def _shard_worker(rank, world, port, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        res = _shard_job(dist.group.WORLD, rank, world)
        parts = [None] * world
        dist.all_gather_object(parts, res)
        if rank == 0:
            torch.save(parts, out)
    finally:
        dist.destroy_process_group()


def _whole(parts):
    """Per-rank shard lists -> the whole tensors (concatenated along dim 0 in rank order)."""
    return [torch.cat(pieces) for pieces in zip(*parts)]


@pytest.mark.slow
def test_dgs_and_apm_on_two_shards_match_one_process(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "shards.pt")
    mp.spawn(_shard_worker, args=(2, port, out), nprocs=2, join=True)
    parts = torch.load(out, weights_only=False)
    one = _shard_job(None, 0, 1)
    for p in parts:   # every rank takes the same decisions
        assert p["eta"] == one["eta"]                            # the same kthvalue / the same bin counts
        assert p["tensor_scale"] == one["tensor_scale"] == [0.1, 1.0, 0.1, 0.1, 1.0]
        assert p["shards"] and not one["shards"]                 # the engine refuses hooks without shards under fsdp
    assert one["eta"][(0.05, "exact")] > one["eta"][(0.5, "exact")]   # not all -inf: thresholds that cut
    assert all(torch.equal(a, b) for a, b in zip(_whole([p["signs"] for p in parts]), one["signs"]))
    for k, ref in enumerate(one["steps"]):
        got = [p["steps"][k] for p in parts]
        for p in got:
            assert p["extras"]["active_fraction"] == ref["extras"]["active_fraction"]
            assert p["extras"]["dgs_eta"] == ref["extras"]["dgs_eta"]
            # mu from moments summed in another order: equal to float64 rounding
            assert p["extras"]["dgs_mu"] == pytest.approx(ref["extras"]["dgs_mu"], rel=1e-12)
        assert ref["extras"]["active_fraction"] < 1 or k == 0
        for what in ("mask", "d", "m"):
            whole = _whole([p[what] for p in got])
            assert all(torch.allclose(a, b, rtol=1e-6, atol=0) if what == "m" else torch.equal(a, b)
                       for a, b in zip(whole, ref[what])), (k, what)
    assert all(torch.equal(a, b) for a, b in zip(_whole([p["final_mask"] for p in parts]), one["final_mask"]))
