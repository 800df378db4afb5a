"""Unlearning objectives (METHODS §1), found by name in `OBJECTIVES`.

Every objective is a loss to MINIMISE. It returns the SUM of its per-unit losses over the batch; the
engine divides by the number of units in the whole optimizer step (all micro-batches, all ranks), so
2 micro-batches give exactly the gradient of 1 double batch (HF Trainer's inner loop gets this wrong
for token-level losses by averaging per micro-batch means). `unit` says what is counted:
"token" (answer tokens, labels != -100), "sequence" (rows) or "position" (non-pad positions, KL).
A per-row mean (RMU) is a "sequence" objective: the sum over rows of each row's own mean.

Batches are dicts from `lab.data.encode_pairs` (input_ids, attention_mask, labels) plus `index` (row
ids into the dataset, for precomputed reference log-probs) and, for idk/dpo, `idk` (the same questions
with an "I don't know" answer).

    total = OBJECTIVES["npo"].fn(model, batch, ctx)     # ctx: ObjectiveContext (ref model, beta, ...)

This module imports nothing else from the lab (the engine, ALKN and methods import it).
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
    ref_model: torch.nn.Module | None = None    # frozen theta_0 (kl, rmu retain, undial)
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


def _answer_logits(model, batch):
    """Logits (float32) at the positions that predict an answer token, [b, L-1, V], with their labels
    (clamped to valid ids) and the mask of those positions."""
    logits = _forward(model, batch).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return logits, labels.clamp(min=0), labels != -100


def _soft_cross_entropy(logits, target):
    """-sum_v target_v log softmax(logits)_v per position (target a detached distribution)."""
    return -(target * F.log_softmax(logits, -1)).sum(-1)


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


def satimp(model, batch, ctx):
    """SatImp (loss reweighting; open-unlearning SatImp): sum over answer tokens of w * log p, i.e.
    -w * NLL minimised, with w = p^beta1 * (1 - p)^beta2 detached (beta1 = 5, beta2 = 1)."""
    logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    p = logp.detach().exp()
    weight = p ** ctx.args.get("beta1", 5.0) * (1 - p) ** ctx.args.get("beta2", 1.0) * mask
    return (weight * logp).sum()


def idk(model, batch, ctx):
    """NLL of an "I don't know" answer to each forget question."""
    return ce(model, batch["idk"], ctx)


def _need_ref_model(ctx, name):
    if ctx.ref_model is None:
        raise ValueError(f"objective {name!r} needs a reference model (ctx.ref_model)")


def kl(model, batch, ctx):
    """KL(p_ref || p_theta) of the next-token distributions, summed over the NON-PADDING positions
    (prompt and answer), ref = frozen theta_0: the "+KL" retain term in the TOFU / open-unlearning
    direction (METHODS §1, kl_form "forward"). open-unlearning also counts padding positions; we do
    not, so the loss does not depend on how a batch is padded (accumulation equivalence)."""
    _need_ref_model(ctx, "kl")
    logp = F.log_softmax(_forward(model, batch).logits.float(), -1)
    with torch.no_grad():
        ref_logp = F.log_softmax(_forward(ctx.ref_model, batch).logits.float(), -1)
    per_position = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (per_position * batch["attention_mask"]).sum()


def kl_reverse_answer(model, batch, ctx):
    """KL(p_theta || p_ref) summed over answer tokens (kl_form "reverse_answer", the lab's earlier form)."""
    _need_ref_model(ctx, "kl")
    logits, _, mask = _answer_logits(model, batch)
    with torch.no_grad():
        ref_logits = _forward(ctx.ref_model, batch).logits[:, :-1].float()
    logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1)
    return (per_token * mask).sum()


def undial(model, batch, ctx):
    """UNDIAL (Dong et al. 2024; open-unlearning UNDIAL): cross-entropy of p_theta against the soft
    target softmax(z_ref - beta * onehot(y)) at each answer position, z_ref the frozen theta_0 logits
    (beta = 10). Summed over answer tokens (open-unlearning averages over every position, prompt and
    padding included, and scatters the -100 label into vocabulary id V-100: not copied)."""
    _need_ref_model(ctx, "undial")
    logits, labels, mask = _answer_logits(model, batch)
    with torch.no_grad():
        ref_logits = _forward(ctx.ref_model, batch).logits[:, :-1].float()
        y = labels[..., None]   # z_ref - beta * onehot(y), without a vocabulary-size one-hot tensor
        target = F.softmax(ref_logits.scatter(-1, y, ref_logits.gather(-1, y) - ctx.args.get("beta", 10.0)), -1)
    return (_soft_cross_entropy(logits, target) * mask).sum()


CEU_IGNORE_FIRST = 1   # CE-U (arXiv 2503.01224, Training Settings footnote): the first answer token is skipped


def _after_first_answer_tokens(mask, n=CEU_IGNORE_FIRST):
    """The answer positions of each row after its first n."""
    return mask & (mask.long().cumsum(1) > n)


def ceu(model, batch, ctx):
    """CE-U (Yang et al. 2025, arXiv 2503.01224; open-unlearning CEU): cross-entropy of p_theta against
    softmax(z with the true token's logit set to -inf), the target detached, at the answer positions
    after the first CEU_IGNORE_FIRST of each row. Its gradient in the logits is p - q: the true token's
    probability goes to 0, the others keep their relative odds."""
    logits, labels, mask = _answer_logits(model, batch)
    with torch.no_grad():
        target = F.softmax(logits.scatter(-1, labels[..., None], float("-inf")), -1)
    return (_soft_cross_entropy(logits, target) * _after_first_answer_tokens(mask)).sum()


def pdu_forget(model, batch, ctx):
    """PDU's forget loss (open-unlearning PDU, logit-margin flattening): (max logit - mean logit)^2,
    summed over the positions that predict an answer token (the lab's answer positions; open-unlearning
    masks the unshifted positions)."""
    logits, _, mask = _answer_logits(model, batch)
    margin = logits.max(-1).values - logits.mean(-1)
    return (margin.pow(2) * mask).sum()


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


SIMNPO_MARGINS = ("paper", "authors")


def simnpo(model, batch, ctx):
    """SimNPO, -(2/beta) log sigmoid(-x) = (2/beta) softplus(x) per row, with (METHODS §1)
        paper   (BLUR eq. 5, default): x = (beta/|y|) log p + delta
        authors (SimNPO code, open-unlearning): x = beta * ((1/|y|) log p + delta)  (margin beta*delta)
    The two agree at delta = 0."""
    beta, delta = ctx.args.get("beta", 2.5), ctx.args.get("delta", 0.0)
    margin = ctx.args.get("simnpo_margin", "paper")
    if margin not in SIMNPO_MARGINS:
        raise ValueError(f"simnpo_margin={margin!r}; valid: {', '.join(SIMNPO_MARGINS)}")
    logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    mean_logp = logp.sum(1) / mask.sum(1).clamp(min=1)
    x = beta * mean_logp + (delta if margin == "paper" else beta * delta)
    return (2.0 / beta * F.softplus(x)).sum()


def dpo(model, batch, ctx):
    """DPO with the idk answer preferred and the forget answer dispreferred (ALKN's DPO+RT),
    in open-unlearning's scaling: -(2/beta) log sigmoid(beta * (win log-ratio - lose log-ratio))."""
    beta = ctx.args.get("beta", 0.1)
    win = sequence_logprob(model, batch["idk"]) - _ref(ctx, batch, "idk")
    lose = sequence_logprob(model, batch) - _ref(ctx, batch, "answer")
    return (-2.0 / beta * F.logsigmoid(beta * (win - lose))).sum()


# ---------------------------------------------------------------- RMU (BLUR eq. 20, WMDP)
def layer_output(model, batch, layer):
    """The OUTPUT of decoder layer `layer` (0-based): hidden_states[layer + 1] in HF's
    output_hidden_states indexing, where hidden_states[0] is the embeddings."""
    return _forward(model, batch, output_hidden_states=True).hidden_states[layer + 1]


def _row_mean(per_position, mask):
    """Per row: the mean over its target positions; summed over rows (a "sequence" objective)."""
    mask = mask.to(per_position.dtype)
    return ((per_position * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()


def _rmu_targets(batch):
    # answer tokens for QA; every token for text (whose labels cover the whole text)
    return batch["labels"] != -100


def rmu_forget(model, batch, ctx):
    """||h_l(x; theta) - c*u||^2 (mean over hidden units) at each target position, h_l the output of
    layer rmu_layer; per row the mean over its target positions, summed over rows."""
    layer, c = ctx.args["rmu_layer"], ctx.args.get("rmu_c", 6.5)
    h = layer_output(model, batch, layer).float()
    per_pos = (h - c * ctx.rmu_direction.to(h.device)).pow(2).mean(-1)
    return _row_mean(per_pos, _rmu_targets(batch))


def rmu_retain(model, batch, ctx):
    """||h_l(x; theta) - h_l(x; theta_0)||^2 (mean over hidden units), per-row mean over target
    positions, summed over rows."""
    layer = ctx.args["rmu_layer"]
    h = layer_output(model, batch, layer).float()
    with torch.no_grad():
        h_ref = layer_output(ctx.ref_model, batch, layer).float()
    return _row_mean((h - h_ref).pow(2).mean(-1), _rmu_targets(batch))


# ---------------------------------------------------------------- ALKN (ALKN eq. 6)
def esl_weights(token_probs, s: float = 10.0, form: str = "paper", k: float = 1.5) -> torch.Tensor:
    """Soft labels of ALKN eq. 6, elementwise on token probabilities p0 of the task's starting model.

    paper:    sigmoid(s * (p0 - 1))                                   (s = 10)
    official: clamp(sigmoid(k * (p0 - 0.8)) - sigmoid(-0.8 * k), max=1)   (released code, k = 1.5)"""
    p = torch.as_tensor(token_probs, dtype=torch.float32)
    if form == "paper":
        return torch.sigmoid(s * (p - 1.0))
    if form == "official":
        return (torch.sigmoid(k * (p - 0.8)) - torch.sigmoid(torch.tensor(-0.8 * k))).clamp(max=1.0)
    raise ValueError(f"esl form={form!r}; valid: 'paper', 'official'")


def esl_loss(model, batch, ctx) -> torch.Tensor:
    """ESL objective ('esl'): sum over answer tokens of -w * log p, w = esl_weights(p0) with p0 the
    token probability at the task's starting weights, precomputed once by the engine into
    ctx.ref_logprob["answer_tokens"] (need 'ref_token_logprob'), gathered by row."""
    if ctx.ref_logprob is None or "answer_tokens" not in ctx.ref_logprob:
        raise ValueError("objective 'esl' needs per-token reference log-probs "
                         "(ctx.ref_logprob['answer_tokens'], computed by the engine)")
    logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
    ref = ctx.ref_logprob["answer_tokens"].to(logp.device)[batch["index"].to(logp.device)]
    # the j-th labelled position of a row is its j-th answer token in the reference
    pos = (mask.long().cumsum(1) - 1).clamp(min=0, max=max(ref.shape[1] - 1, 0))
    p0 = ref.gather(1, pos).exp() if ref.shape[1] else torch.ones_like(logp)
    args = ctx.args
    w = esl_weights(p0, args.get("esl_s", 10.0), args.get("esl_form", "paper"), args.get("esl_k", 1.5))
    return -(w.detach() * logp * mask).sum()


esl = esl_loss


# ---------------------------------------------------------------- registry
def _tokens(batch):
    return (batch["labels"][:, 1:] != -100).sum()


def _idk_tokens(batch):
    return _tokens(batch["idk"])


def _ceu_tokens(batch):
    return _after_first_answer_tokens(batch["labels"][:, 1:] != -100).sum()


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
    "kl": Objective(kl, _positions, ("ref_model",)),                           # kl_form "forward"
    "kl_reverse_answer": Objective(kl_reverse_answer, _tokens, ("ref_model",)),  # kl_form "reverse_answer"
    "npo": Objective(npo, _rows, ("ref_logprob",)),
    "simnpo": Objective(simnpo, _rows),
    "dpo": Objective(dpo, _rows, ("ref_logprob", "idk")),
    "undial": Objective(undial, _tokens, ("ref_model",)),
    "ceu": Objective(ceu, _ceu_tokens),
    "satimp": Objective(satimp, _tokens),
    "pdu": Objective(pdu_forget, _tokens),
    "rmu": Objective(rmu_forget, _rows, ("rmu",)),          # forget side of RMU
    "rmu_forget": Objective(rmu_forget, _rows, ("rmu",)),
    "rmu_retain": Objective(rmu_retain, _rows, ("ref_model",)),
    "esl": Objective(esl_loss, _tokens, ("ref_token_logprob",)),   # ALKN; p0 per token at the task's start
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
