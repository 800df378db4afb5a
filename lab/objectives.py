"""Unlearning objectives (METHODS §1), found by name in `OBJECTIVES`.

Every objective is a loss to MINIMISE. It returns the SUM of its per-unit losses over the batch; the
engine divides by the number of units in the whole optimizer step (all micro-batches, all ranks), so
2 micro-batches give exactly the gradient of 1 double batch (HF Trainer's inner loop gets this wrong
for token-level losses by averaging per micro-batch means). `unit` says what is counted:
"token" (answer tokens, labels != -100), "sequence" (rows) or "position" (non-pad positions, RMU).

Batches are dicts from `lab.data.encode_pairs` (input_ids, attention_mask, labels) plus `index` (row
ids into the dataset, for precomputed reference log-probs) and, for idk/dpo, `idk` (the same questions
with an "I don't know" answer).

    total = OBJECTIVES["npo"].fn(model, batch, ctx)     # ctx: ObjectiveContext (ref model, beta, ...)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class ObjectiveContext:
    """What objectives may read besides the model and batch. Built once per run/task by the engine."""
    args: dict                                  # method hyper-parameters: beta, delta, alpha, rmu_*, ...
    ref_model: torch.nn.Module | None = None    # frozen theta_0 (kl, rmu retain)
    ref_logprob: dict | None = None             # {"answer": tensor[n_rows], "idk": tensor[n_rows]} at theta_0
    rmu_direction: torch.Tensor | None = None   # fixed random unit vector u (RMU)
    autocast_dtype: torch.dtype | None = None


def _forward(model, batch, **kw):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)


def answer_token_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    """log p(token) of each next-token label (float32), and the mask of labelled positions."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),
                          shift_labels.clamp(min=0).reshape(-1), reduction="none")
    return -nll.view_as(shift_labels) * mask, mask


def sequence_logprob(model, batch) -> torch.Tensor:
    """log p(y|x) = sum of answer-token log-probs per row (METHODS notation)."""
    logp, _ = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    return logp.sum(1)


# ---------------------------------------------------------------- token-level objectives
def ce(model, batch, ctx):
    """Retain NLL ("RT"/"GD" term): sum of answer-token NLL."""
    logp, _ = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    return -logp.sum()


def ga(model, batch, ctx):
    """Gradient ascent: -NLL on forget answers (minimising it raises the NLL)."""
    logp, _ = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    return logp.sum()


def wga(model, batch, ctx):
    """Weighted GA: sum of w * log p with w = p^alpha detached (GRU baseline; alpha = 1)."""
    logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    weight = torch.exp(logp.detach() * ctx.args.get("alpha", 1.0)) * mask
    return (weight * logp).sum()


def idk(model, batch, ctx):
    """NLL of an "I don't know" answer to each forget question."""
    return ce(model, batch["idk"], ctx)


def kl(model, batch, ctx):
    """KL(p_theta || p_ref) summed over answer tokens, ref = frozen theta_0 (the "+KL" retain term)."""
    if ctx.ref_model is None:
        raise ValueError("objective 'kl' needs a reference model (ctx.ref_model)")
    logits = _forward(model, batch).logits[:, :-1].float()
    with torch.no_grad():
        ref_logits = _forward(ctx.ref_model, batch).logits[:, :-1].float()
    mask = batch["labels"][:, 1:] != -100
    logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1)
    return (per_token * mask).sum()


# ---------------------------------------------------------------- sequence-level objectives
def _ref(ctx, batch, key="answer"):
    if ctx.ref_logprob is None or key not in ctx.ref_logprob:
        raise ValueError(f"objective needs reference log-probs {key!r} (precomputed by the engine)")
    return ctx.ref_logprob[key].to(batch["input_ids"].device)[batch["index"]]


def npo(model, batch, ctx):
    """NPO: (2/beta) log(1 + (p_theta/p_ref)^beta) per row = (2/beta) softplus(beta * log-ratio)
    on SEQUENCE log-probs (NGDiff eq. 7, BLUR eq. 4, GRU eq. 4), never raw logits."""
    beta = ctx.args.get("beta", 0.1)
    log_ratio = sequence_logprob(model, batch) - _ref(ctx, batch)
    return (2.0 / beta * F.softplus(beta * log_ratio)).sum()


def simnpo(model, batch, ctx):
    """SimNPO (BLUR eq. 5): -(2/beta) log sigmoid(-(beta/|y|) log p - delta) = (2/beta) softplus(...)."""
    beta, delta = ctx.args.get("beta", 2.5), ctx.args.get("delta", 0.0)
    logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    length = mask.sum(1).clamp(min=1)
    return (2.0 / beta * F.softplus(beta * logp.sum(1) / length + delta)).sum()


def dpo(model, batch, ctx):
    """DPO with the idk answer preferred and the forget answer dispreferred (ALKN's DPO+RT),
    in open-unlearning's scaling: -(2/beta) log sigmoid(beta * (win log-ratio - lose log-ratio))."""
    beta = ctx.args.get("beta", 0.1)
    win = sequence_logprob(model, batch["idk"]) - _ref(ctx, batch, "idk")
    lose = sequence_logprob(model, batch) - _ref(ctx, batch, "answer")
    return (-2.0 / beta * F.logsigmoid(beta * (win - lose))).sum()


# ---------------------------------------------------------------- RMU (BLUR eq. 20)
def _hidden(model, batch, layer):
    return _forward(model, batch, output_hidden_states=True).hidden_states[layer]


def rmu_forget(model, batch, ctx):
    """||h_l(x; theta) - c*u||^2 per position (mean over hidden units), summed over non-pad positions."""
    layer, c = ctx.args.get("rmu_layer", 2), ctx.args.get("rmu_c", 6.5)
    h = _hidden(model, batch, layer).float()
    per_pos = (h - c * ctx.rmu_direction.to(h.device)).pow(2).mean(-1)
    return (per_pos * batch["attention_mask"]).sum()


def rmu_retain(model, batch, ctx):
    """||h_l(x; theta) - h_l(x; theta_0)||^2 per position, summed over non-pad positions."""
    layer = ctx.args.get("rmu_layer", 2)
    h = _hidden(model, batch, layer).float()
    with torch.no_grad():
        h_ref = _hidden(ctx.ref_model, batch, layer).float()
    return ((h - h_ref).pow(2).mean(-1) * batch["attention_mask"]).sum()


# ---------------------------------------------------------------- ALKN (ALKN eq. 6)
def esl(model, batch, ctx):
    """Entropic soft-label fine-tuning loss: sum of -w * log p over answer tokens (lab.alkn.esl_loss)."""
    from lab.alkn import esl_loss
    return esl_loss(model, batch, ctx)


# ---------------------------------------------------------------- registry
def _tokens(batch):
    return (batch["labels"][:, 1:] != -100).sum()


def _idk_tokens(batch):
    return _tokens(batch["idk"])


def _rows(batch):
    return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)


def _positions(batch):
    return batch["attention_mask"].sum()


@dataclasses.dataclass(frozen=True)
class Objective:
    fn: Callable
    count: Callable           # units in a batch (the normaliser); see module docstring
    needs: tuple = ()         # "ref_model", "ref_logprob", "idk", "rmu"


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(ce, _tokens),
    "ga": Objective(ga, _tokens),
    "wga": Objective(wga, _tokens),
    "idk": Objective(idk, _idk_tokens, ("idk",)),
    "kl": Objective(kl, _tokens, ("ref_model",)),
    "npo": Objective(npo, _rows, ("ref_logprob",)),
    "simnpo": Objective(simnpo, _rows),
    "dpo": Objective(dpo, _rows, ("ref_logprob", "idk")),
    "rmu": Objective(rmu_forget, _positions, ("rmu",)),          # forget side of RMU
    "rmu_forget": Objective(rmu_forget, _positions, ("rmu",)),
    "rmu_retain": Objective(rmu_retain, _positions, ("ref_model",)),
    "esl": Objective(esl, _tokens, ("ref_token_logprob",)),   # ALKN; p0 per token at the task's start
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
