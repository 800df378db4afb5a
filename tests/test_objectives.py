"""Objectives against hand computations on a small random Llama (no tokenizer needed)."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lab.objectives import OBJECTIVES, ObjectiveContext, get_objective, sequence_logprob


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _batch(seed=0, rows=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100                        # prompt
    attn[0, -2:] = 0                            # row 0 right-padded
    labels[0, -2:] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "index": torch.arange(rows)}


def _token_logprobs(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["labels"][:, 1:].clamp(min=0)[..., None])[..., 0]
    return lp, batch["labels"][:, 1:] != -100


def test_ce_is_sum_of_token_nll_and_matches_hf_loss():
    model, batch = _model(), _batch()
    ctx = ObjectiveContext(args={})
    total = OBJECTIVES["ce"].fn(model, batch, ctx)
    n = OBJECTIVES["ce"].count(batch)
    hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert int(n) == 3 * 5 - 2   # labels at positions 4..8, row 0 loses 2 to padding
    assert torch.allclose(total / n, hf, atol=1e-5)
    assert torch.allclose(OBJECTIVES["ga"].fn(model, batch, ctx), -total)


def test_wga_weights_are_token_probabilities():
    model, batch = _model(), _batch()
    lp, mask = _token_logprobs(model, batch)
    expected = (lp.exp() * lp * mask).sum()
    got = OBJECTIVES["wga"].fn(model, batch, ObjectiveContext(args={"alpha": 1.0}))
    assert torch.allclose(got, expected, atol=1e-5)
    # alpha = 0 -> plain GA
    ga = OBJECTIVES["ga"].fn(model, batch, ObjectiveContext(args={}))
    assert torch.allclose(OBJECTIVES["wga"].fn(model, batch, ObjectiveContext(args={"alpha": 0.0})), ga)


def test_npo_at_reference_is_2_over_beta_log2_per_row_and_uses_sequence_logprobs():
    model, batch = _model(), _batch()
    with torch.no_grad():
        ref = sequence_logprob(model, batch)
    beta = 0.1
    ctx = ObjectiveContext(args={"beta": beta}, ref_logprob={"answer": ref})
    got = OBJECTIVES["npo"].fn(model, batch, ctx)
    assert got.item() == pytest.approx(3 * 2 / beta * math.log(2), rel=1e-5)
    # shifted reference: hand formula (2/beta) log(1 + exp(beta * (lp - ref)))
    ctx.ref_logprob = {"answer": ref + torch.tensor([1.0, -2.0, 0.5])}
    lp = ref
    expected = sum(2 / beta * math.log1p(math.exp(beta * (a - b)))
                   for a, b in zip(lp.tolist(), ctx.ref_logprob["answer"].tolist()))
    assert OBJECTIVES["npo"].fn(model, batch, ctx).item() == pytest.approx(expected, rel=1e-5)
    assert int(OBJECTIVES["npo"].count(batch)) == 3


def _mean_answer_logprob(model, batch):
    with torch.no_grad():
        lp, mask = _token_logprobs(model, batch)
    return [float((l * m).sum() / m.sum()) for l, m in zip(lp, mask)]


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_simnpo_margin_paper_and_authors_by_hand(delta):
    model, batch = _model(), _batch()
    beta = 2.5
    mean_lp = _mean_answer_logprob(model, batch)
    # paper (BLUR eq. 5): -(2/beta) log sigmoid(-(beta/|y|) log p - delta)
    paper = sum(-2 / beta * math.log(1 / (1 + math.exp(beta * m + delta))) for m in mean_lp)
    # authors (SimNPO code, open-unlearning): -(2/beta) log sigmoid(-beta ((1/|y|) log p + delta))
    authors = sum(-2 / beta * math.log(1 / (1 + math.exp(beta * (m + delta)))) for m in mean_lp)
    got = {form: OBJECTIVES["simnpo"].fn(model, batch, ObjectiveContext(
        args={"beta": beta, "delta": delta, "simnpo_margin": form})).item() for form in ("paper", "authors")}
    assert got["paper"] == pytest.approx(paper, rel=1e-5)
    assert got["authors"] == pytest.approx(authors, rel=1e-5)
    default = OBJECTIVES["simnpo"].fn(model, batch, ObjectiveContext(args={"beta": beta, "delta": delta})).item()
    assert default == got["paper"]
    if delta == 0.0:
        assert got["paper"] == pytest.approx(got["authors"], rel=1e-7)
    else:
        assert got["authors"] > 1.2 * got["paper"]      # margin beta*delta > delta: a larger loss
    with pytest.raises(ValueError, match="simnpo_margin='author'; valid: paper, authors"):
        OBJECTIVES["simnpo"].fn(model, batch, ObjectiveContext(args={"simnpo_margin": "author"}))


def _kl_by_hand(p_logits, q_logits, mask):
    """sum over masked positions of sum_v p_v (log p_v - log q_v), position by position."""
    total = 0.0
    for r, t in mask.nonzero().tolist():
        p, q = torch.softmax(p_logits[r, t].double(), -1), torch.softmax(q_logits[r, t].double(), -1)
        total += float((p * (p.log() - q.log())).sum())
    return total


def test_kl_default_is_ref_to_theta_over_non_padding_positions():
    model, ref, batch = _model(0), _model(1), _batch()
    fwd = lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        z, z_ref = fwd(model), fwd(ref)
    ctx = ObjectiveContext(args={}, ref_model=ref)
    # default: KL(p_ref || p_theta) at every non-padding position (prompt and answer)
    expected = _kl_by_hand(z_ref, z, batch["attention_mask"].bool())
    assert OBJECTIVES["kl"].fn(model, batch, ctx).item() == pytest.approx(expected, rel=1e-5)
    assert int(OBJECTIVES["kl"].count(batch)) == 3 * 9 - 2
    # kl_form reverse_answer: KL(p_theta || p_ref) at the positions that predict an answer token
    answer = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    answer[:, :-1] = batch["labels"][:, 1:] != -100
    expected_rev = _kl_by_hand(z, z_ref, answer)
    assert OBJECTIVES["kl_reverse_answer"].fn(model, batch, ctx).item() == pytest.approx(expected_rev, rel=1e-5)
    assert int(OBJECTIVES["kl_reverse_answer"].count(batch)) == 3 * 5 - 2


def test_kl_does_not_depend_on_padding_and_accumulates_exactly():
    model, ref, batch = _model(0), _model(1), _batch()
    ctx = ObjectiveContext(args={}, ref_model=ref)
    kl = OBJECTIVES["kl"]
    whole = kl.fn(model, batch, ctx) / kl.count(batch)
    # three more padding positions on the right: same loss (open-unlearning's mean over every position moves)
    padded = {"input_ids": torch.cat([batch["input_ids"], torch.zeros(3, 3, dtype=torch.long)], 1),
              "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(3, 3, dtype=torch.long)], 1),
              "labels": torch.cat([batch["labels"], torch.full((3, 3), -100)], 1), "index": batch["index"]}
    assert torch.allclose(kl.fn(model, padded, ctx) / kl.count(padded), whole, atol=1e-6)
    # micro-batches of 1 and 2 rows: the sum over parts / the units of the whole step
    parts = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 1), slice(1, 3))]
    split = sum(kl.fn(model, p, ctx) for p in parts) / sum(kl.count(p) for p in parts)
    assert torch.allclose(split, whole, atol=1e-6)


def test_kl_form_option_swaps_the_objective_and_is_validated():
    from lab.methods import get_method
    for name in ("ga_kl", "npo_kl", "gru_npo_kl"):
        method, args = get_method(name)
        assert args["kl_form"] == "forward" and "kl" in [t.objective for t in (*method.forget, *method.retain)]
        method, args = get_method(name, kl_form="reverse_answer")
        objectives = [t.objective for t in (*method.forget, *method.retain)]
        assert "kl_reverse_answer" in objectives and "kl" not in objectives
    with pytest.raises(ValueError, match="kl_form='reverse'; valid: forward, reverse_answer"):
        get_method("npo_kl", kl_form="reverse")


def test_dpo_at_reference_and_idk():
    model, batch = _model(), _batch()
    batch["idk"] = _batch(seed=5)
    with torch.no_grad():
        ref = {"answer": sequence_logprob(model, batch), "idk": sequence_logprob(model, batch["idk"])}
    beta = 0.1
    got = OBJECTIVES["dpo"].fn(model, batch, ObjectiveContext(args={"beta": beta}, ref_logprob=ref))
    assert got.item() == pytest.approx(3 * 2 / beta * math.log(2), rel=1e-5)
    ce_idk = OBJECTIVES["ce"].fn(model, batch["idk"], ObjectiveContext(args={}))
    assert torch.allclose(OBJECTIVES["idk"].fn(model, batch, ObjectiveContext(args={})), ce_idk)


def test_rmu_steers_the_output_of_layer_l_per_row_mean_over_answer_tokens():
    # METHODS §1: h_l = OUTPUT of decoder layer l = hidden_states[l + 1]; per row the mean over its target
    # positions (answer tokens for QA), then over rows (the engine divides the row sum by the rows)
    model, batch = _model(), _batch()
    u = torch.zeros(32)
    u[0] = 1.0
    ctx = ObjectiveContext(args={"rmu_layer": 0, "rmu_c": 2.0}, rmu_direction=u, ref_model=_model())
    h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              output_hidden_states=True).hidden_states[1]          # output of layer 0
    per_pos = (h - 2.0 * u).pow(2).mean(-1)
    answer = batch["labels"] != -100
    expected = sum(per_pos[r][answer[r]].mean() for r in range(3))
    assert torch.allclose(OBJECTIVES["rmu"].fn(model, batch, ctx), expected, atol=1e-4)
    assert OBJECTIVES["rmu_retain"].fn(model, batch, ctx).abs() < 1e-6   # same weights as reference
    assert int(OBJECTIVES["rmu"].count(batch)) == 3 == int(OBJECTIVES["rmu_retain"].count(batch))
    # retain: squared distance to the reference's output of the same layer, same per-row mean
    other = _model(1)
    h_ref = other(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  output_hidden_states=True).hidden_states[1]
    per_pos = (h - h_ref).pow(2).mean(-1)
    expected = sum(per_pos[r][answer[r]].mean() for r in range(3))
    ctx.ref_model = other
    assert torch.allclose(OBJECTIVES["rmu_retain"].fn(model, batch, ctx), expected, atol=1e-4)


def test_rmu_defaults_give_every_trainable_layer_a_gradient():
    """With the default layers (scaled to a 4-layer model: steer layer 2's output, train layers 0-2)
    each trainable down-projection gets a non-zero gradient; steering hidden_states[l] (the input of
    layer l) left layer l's own projection with exactly zero gradient."""
    from lab.engine import trainable_parameters
    from lab.methods import fit_to_model, get_method
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model, batch = LlamaForCausalLM(cfg), _batch()
    method, args = get_method("rmu")
    args = fit_to_model(method, args, model)
    assert args["rmu_layer"] == 2 and args["rmu_layers"] == [0, 1, 2]
    params = trainable_parameters(model, method, args)
    assert len(params) == 3
    u = torch.ones(32) / 32 ** 0.5
    ctx = ObjectiveContext(args=args, rmu_direction=u, ref_model=_model())
    OBJECTIVES["rmu"].fn(model, batch, ctx).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_rmu_layer_scales_with_depth_and_is_recorded():
    from types import SimpleNamespace

    from lab.methods import fit_to_model, get_method
    method, args = get_method("rmu")
    assert args["rmu_c"] == 6.5 and args["rmu_alpha"] == 1200.0       # WMDP's RMU (7B)
    depth = lambda n: SimpleNamespace(config=SimpleNamespace(num_hidden_layers=n))
    assert fit_to_model(method, args, depth(32)) == {**args, "rmu_layer": 7, "rmu_layers": [5, 6, 7]}
    assert fit_to_model(method, args, depth(30))["rmu_layer"] == 7       # SmolLM2
    assert fit_to_model(method, args, depth(4))["rmu_layers"] == [0, 1, 2]
    assert fit_to_model(method, {**args, "rmu_layer": 3}, depth(32))["rmu_layers"] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"rmu_layer=9; valid: 0\.\.3"):
        fit_to_model(method, {**args, "rmu_layer": 9}, depth(4))
    blur_rmu, blur_args = get_method("blur_rmu")
    assert blur_args["gamma"] == 0.00125 and blur_rmu.paper_run == {"lr": 4e-2, "max_steps": 150}


def test_unknown_objective_lists_valid():
    with pytest.raises(ValueError, match="valid: .*npo"):
        get_objective("nope")


# ---------------------------------------------------------------- open-unlearning's objectives, by hand
class LogitModel(torch.nn.Module):
    """A "model" whose logits ARE its parameter [rows, length, vocab]: losses and gradients by hand."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.nn.Parameter(z.clone())

    def forward(self, input_ids, attention_mask, **kw):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.z)


def _two_rows():
    """2 rows, length 5, vocabulary 4: row 0 = 2 prompt + 3 answer tokens, row 1 = 1 prompt + 3 answer + 1 pad."""
    ids = torch.tensor([[1, 2, 3, 0, 2], [3, 1, 1, 2, 0]])
    labels = torch.tensor([[-100, -100, 3, 0, 2], [-100, 1, 1, 2, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    z = torch.tensor([[[0.1, 0.5, -0.3, 1.0], [0.0, 0.2, 0.4, -0.1], [1.2, -0.5, 0.3, 0.0],
                       [-0.2, 0.1, 0.9, 0.3], [0.5, 0.5, 0.5, 0.5]],
                      [[0.3, -0.1, 0.2, 0.8], [0.7, 0.1, -0.4, 0.2], [-0.3, 0.6, 0.0, 0.1],
                       [0.2, 0.2, -0.6, 1.1], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels, "index": torch.arange(2)}
    # (row, position t, label y) for every position t whose NEXT token is an answer token: y = labels[t + 1]
    answer = [(r, t, int(labels[r, t + 1])) for r in range(2) for t in range(4) if labels[r, t + 1] != -100]
    return z, batch, answer


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _check(objective, z, batch, ctx, loss, grad):
    model = LogitModel(z)
    got = OBJECTIVES[objective].fn(model, batch, ctx)
    assert got.item() == pytest.approx(loss, rel=1e-6, abs=1e-9)
    got.backward()
    assert torch.allclose(model.z.grad.double(), grad, atol=1e-6), (model.z.grad, grad)


def test_undial_loss_and_gradient_by_hand():
    z, batch, answer = _two_rows()
    z_ref = z.flip(-1) * 0.7                                      # a different frozen theta_0
    beta = 10.0
    loss, grad = 0.0, torch.zeros_like(z)
    for r, t, y in answer:
        target = _softmax([z_ref[r, t, v].item() - (beta if v == y else 0.0) for v in range(4)])
        p = _softmax(z[r, t].tolist())
        loss += -sum(q * math.log(pv) for q, pv in zip(target, p))
        grad[r, t] = torch.tensor(p) - torch.tensor(target)      # d CE(softmax(z), q) / dz = p - q
    ctx = ObjectiveContext(args={"beta": beta}, ref_model=LogitModel(z_ref).requires_grad_(False))
    _check("undial", z, batch, ctx, loss, grad)
    assert int(OBJECTIVES["undial"].count(batch)) == len(answer) == 6


def test_ceu_loss_and_gradient_by_hand():
    z, batch, answer = _two_rows()
    loss, grad = 0.0, torch.zeros_like(z)
    kept = [(r, t, y) for r, t, y in answer if t > min(t2 for r2, t2, _ in answer if r2 == r)]  # skip first
    for r, t, y in kept:
        p = _softmax(z[r, t].tolist())
        others = _softmax([z[r, t, v].item() if v != y else -1e30 for v in range(4)])   # true token at -inf
        loss += -sum(q * math.log(pv) for q, pv in zip(others, p))
        grad[r, t] = torch.tensor(p) - torch.tensor(others)      # the target is detached
    _check("ceu", z, batch, ObjectiveContext(args={}), loss, grad)
    assert int(OBJECTIVES["ceu"].count(batch)) == len(kept) == 4


def test_satimp_loss_and_gradient_by_hand():
    z, batch, answer = _two_rows()
    b1, b2 = 5.0, 1.0
    loss, grad = 0.0, torch.zeros_like(z)
    for r, t, y in answer:
        p = _softmax(z[r, t].tolist())
        w = p[y] ** b1 * (1 - p[y]) ** b2                          # detached weight
        loss += w * math.log(p[y])                                 # -w * NLL, minimised
        grad[r, t] = w * (torch.nn.functional.one_hot(torch.tensor(y), 4).double() - torch.tensor(p))
    _check("satimp", z, batch, ObjectiveContext(args={"beta1": b1, "beta2": b2}), loss, grad)


def test_pdu_forget_loss_and_gradient_by_hand():
    z, batch, answer = _two_rows()
    loss, grad = 0.0, torch.zeros_like(z)
    for r, t, _ in answer:
        v = z[r, t].tolist()
        m = max(v) - sum(v) / 4
        loss += m * m                                              # (max logit - mean logit)^2
        grad[r, t] = 2 * m * (torch.nn.functional.one_hot(torch.tensor(v.index(max(v))), 4).double() - 0.25)
    _check("pdu", z, batch, ObjectiveContext(args={}), loss, grad)


def test_objectives_import_nothing_of_the_engine():
    """Issue 17: no import circle. lab.objectives imports no other lab module (statically), and
    computing ESL - once imported back from lab.alkn - imports neither lab.alkn nor lab.engine."""
    import ast
    import pathlib
    import subprocess
    import sys
    src = pathlib.Path(__file__).resolve().parents[1] / "lab" / "objectives.py"
    tree = ast.parse(src.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m == "lab" or m.startswith("lab.")}, imported
    code = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lab.objectives import OBJECTIVES, ObjectiveContext
cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4)
ids = torch.randint(0, 50, (2, 6)); labels = ids.clone(); labels[:, :3] = -100
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "index": torch.arange(2)}
ctx = ObjectiveContext(args={}, ref_logprob={"answer_tokens": torch.full((2, 3), -1.0)})
OBJECTIVES["esl"].fn(LlamaForCausalLM(cfg), batch, ctx)
print(sorted(m for m in sys.modules if m in ("lab.alkn", "lab.engine", "lab.methods")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    from lab import alkn, objectives
    assert alkn.esl_loss is objectives.esl_loss and alkn.esl_weights is objectives.esl_weights
