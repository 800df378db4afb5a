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


def test_simnpo_hand_formula():
    model, batch = _model(), _batch()
    lp, mask = _token_logprobs(model, batch)
    beta, delta = 2.5, 0.3
    expected = sum(-2 / beta * F.logsigmoid(-(beta / m.sum()) * l.sum() - delta)
                   for l, m in zip(lp * mask, mask))
    got = OBJECTIVES["simnpo"].fn(model, batch, ObjectiveContext(args={"beta": beta, "delta": delta}))
    assert torch.allclose(got, expected, atol=1e-5)


def test_kl_zero_against_itself_positive_against_other_model():
    model, batch = _model(0), _batch()
    assert OBJECTIVES["kl"].fn(model, batch, ObjectiveContext(args={}, ref_model=_model(0))).abs() < 1e-4
    other = OBJECTIVES["kl"].fn(model, batch, ObjectiveContext(args={}, ref_model=_model(1)))
    assert other > 0.1
    with pytest.raises(ValueError, match="reference model"):
        OBJECTIVES["kl"].fn(model, batch, ObjectiveContext(args={}))


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


def test_rmu_forget_and_retain():
    model, batch = _model(), _batch()
    u = torch.zeros(32)
    u[0] = 1.0
    ctx = ObjectiveContext(args={"rmu_layer": 1, "rmu_c": 2.0}, rmu_direction=u, ref_model=_model())
    h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              output_hidden_states=True).hidden_states[1]
    expected = ((h - 2.0 * u).pow(2).mean(-1) * batch["attention_mask"]).sum()
    assert torch.allclose(OBJECTIVES["rmu"].fn(model, batch, ctx), expected, atol=1e-4)
    assert OBJECTIVES["rmu_retain"].fn(model, batch, ctx).abs() < 1e-6   # same weights as reference
    assert int(OBJECTIVES["rmu"].count(batch)) == 3 * 9 - 2


def test_unknown_objective_lists_valid():
    with pytest.raises(ValueError, match="valid: .*npo"):
        get_objective("nope")
