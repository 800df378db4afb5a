"""The unlearning engine: ONE loop for every method (METHODS §1-3, §7).

One optimizer step:
  1. sample a forget batch and a retain batch, split into micro-batches;
  2. backward the forget terms into g_f and the retain terms into g_r SEPARATELY, accumulating each
     over all micro-batches (and ranks), normalised by the units of the WHOLE step - or, when the
     combiner is a plain sum and no diagnostics are due, the weighted terms into ONE gradient (each
     term's backward right after its forward, so one term's activations are alive at a time);
  3. combine g_f, g_r into the direction d (lab.methods.combine -> lab.geometry);
  4. modifiers: clip (max_grad_norm), AutoLR (NGDiff Alg. 1: set the lr from two probe losses);
  5. hand d to the optimizer (AdamW by default, as the papers) via p.grad and step;
  6. write a trace row (losses, ||g_f||, ||g_r||, cos, A_f, A_r, realised-update cosines, lr, method
     extras) - the raw material of the dashboard.

    from lab.engine import unlearn
    result = unlearn(method="npo_gd", model="tiny", benchmark="tofu_subset", epochs=5)
    result.metrics["forget_rouge"], result.run_dir

Gradient lists are per-parameter tensors; scalars stay tensors until the one host sync per step that
writes the trace row. A NaN/inf loss or direction stops the run (status "diverged") before the
optimizer step, keeping the trace so far and the last good weights (`<run>/last_good/`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lab.progress import tqdm   # one line per bar when stderr is not a terminal

from lab import distributed, geometry, lora, runs
from lab.methods import (Method, Term, combine, direction_coefficients, fit_to_model, get_method,
                         retain_term_weights, retain_weight)
from lab.objectives import ObjectiveContext, get_objective, sequence_logprob

# Unlearning lr per model when the config leaves it out: the papers use 1e-5 (7B, Phi-1.5); a small
# from-scratch model needs a larger step to move at all in a few dozen steps.
DEFAULT_LR = {"tiny": 1e-3, "smollm2-135m": 1e-5, None: 1e-5}


# integer fields of UnlearnConfig: name -> (lowest valid value, None allowed); lab.cli checks --config /
# --set values against the same table. eval_every 0 = at the end only, like None (`--eval-every 0`).
INT_FIELDS = {"epochs": (1, False), "batch_size": (1, False), "max_steps": (1, True), "micro_batch_size": (1, True),
              "retain_batch_size": (1, True), "eval_limit": (1, True), "eval_every": (0, True),
              "eval_batch_size": (1, False), "diagnostics": (0, False), "warmup_steps": (0, False),
              "max_length": (1, False), "nproc": (1, False)}


@dataclasses.dataclass
class UnlearnConfig:
    """Everything a run needs; saved to config.yaml. See `lab unlearn --help` for the CLI mapping."""
    method: str = "npo_gd"
    model: str = "tiny"
    benchmark: str = "tofu_subset"
    benchmark_kwargs: dict = dataclasses.field(default_factory=dict)
    method_args: dict = dataclasses.field(default_factory=dict)
    lr: float | None = None                 # None -> DEFAULT_LR[model]
    epochs: int = 5                         # passes over the forget set
    max_steps: int | None = None            # stop early (tests, smoke runs)
    batch_size: int = 8                     # forget rows per optimizer step
    micro_batch_size: int | None = None     # gradient accumulation: rows per forward/backward
    retain_batch_size: int | None = None    # retain rows per step (default batch_size)
    optimizer: str = "adamw"                # adamw | sgd
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    schedule: str = "constant"              # constant | linear (decay to 0) ; warmup_steps first
    warmup_steps: int = 0
    max_grad_norm: float | None = None      # clip modifier on d
    diagnostics: int = 1                    # trace geometry every k steps (0 = off)
    eval_every: int | None = None           # evaluate every k steps (None: only at the end)
    eval_limit: int | None = None           # rows per eval set (None: all)
    eval_batch_size: int = 16
    score_eos: bool = True                  # answers scored with EOS (TOFU / open-unlearning); False: without
    eval_options: dict = dataclasses.field(default_factory=dict)  # lab.eval.metric_options (privleak_score, ...)
    seed: int = 0
    autocast: str | None = None             # e.g. "bfloat16" (CPU: ~2.5x faster on SmolLM2)
    max_length: int = 512
    forget_text_rows: str = "chunks"        # text forget sets (MUSE): "chunks" | "truncated" (lab.data)
    device: str = "cpu"
    prepare: dict = dataclasses.field(default_factory=dict)   # lab.prepare hyper-parameter overrides
    save_model: bool = False                # write the unlearned weights into the run directory
    runs_root: str = "runs"
    parallel: str = "none"                  # none | ddp | fsdp: under torchrun / accelerate launch (lab.distributed)
    nproc: int = 1                          # > 1 outside a launcher: unlearn() starts that many ranks (torchrun)
    probes: list = dataclasses.field(default_factory=list)         # lab.probes on the final model (METHODS §8)
    probe_options: dict = dataclasses.field(default_factory=dict)  # lab.probes.DEFAULTS overrides
    lora: str | dict | None = None          # peft LoRA adapters: "r=16,alpha=32,dropout=0,targets=q_proj,v_proj" (lab.lora)

    def __post_init__(self):
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule={self.schedule!r}; valid: 'constant', 'linear'")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}; valid: 'adamw', 'sgd'")
        from lab.data import FORGET_TEXT_ROWS
        if self.forget_text_rows not in FORGET_TEXT_ROWS:
            raise ValueError(f"forget_text_rows={self.forget_text_rows!r}; valid: {', '.join(FORGET_TEXT_ROWS)}")
        for name, (low, optional) in INT_FIELDS.items():   # before any work, as the CLI's flags
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name}={value!r}; valid: an int >= {low}" + (" or None" if optional else ""))
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb or (self.retain_batch_size or self.batch_size) % mb:
            raise ValueError(f"micro_batch_size={mb} must divide batch_size={self.batch_size} and "
                             f"retain_batch_size={self.retain_batch_size or self.batch_size}")
        self.betas = tuple(self.betas)
        get_method(self.method, **self.method_args)  # validates name and options early
        if self.parallel not in distributed.MODES:
            raise ValueError(f"parallel={self.parallel!r}; valid: {', '.join(distributed.MODES)}")
        if self.nproc > 1 and self.parallel == "none":
            raise ValueError(f"nproc={self.nproc} needs parallel 'ddp' or 'fsdp' (the ranks split the work)")
        from lab.lora import parse_spec
        self.lora = parse_spec(self.lora)   # recorded as the full dict (r, alpha, dropout, targets)
        if self.lora and (self.parallel == "fsdp" or get_method(self.method, **self.method_args)[0].trainable):
            raise ValueError("lora: not with --parallel fsdp or a method that picks its own trainable "
                             "weights (rmu); use --parallel none|ddp")
        from lab.eval import metric_options
        self.eval_options = metric_options(**self.eval_options)  # recorded with the defaults filled in
        if self.probes or self.probe_options:  # recorded with their defaults filled in
            from lab.probes import check_options
            self.probes, self.probe_options = check_options(self.probes, self.probe_options, self.benchmark)


# ---------------------------------------------------------------- batches
def _idk_choice(rows: torch.Tensor, n_idk: int) -> list[int]:
    # a fixed idk answer per forget row, so reference log-probs can be computed once
    return [(int(r) * 7919) % n_idk for r in rows]


def encode_rows(tokenizer, dataset, rows, *, max_length, idk_answers=None) -> dict:
    """Rows of a QA (question/answer) or text (text) dataset -> an encode_pairs batch + index (+ idk)."""
    from lab.data import encode_pairs, format_question
    rows = [int(r) for r in rows]
    sub = dataset.select(rows)
    if "question" in sub.column_names:
        prompts = [format_question(tokenizer, q) for q in sub["question"]]
        batch = encode_pairs(tokenizer, prompts, list(sub["answer"]), max_length=max_length)
    else:  # raw text (MUSE corpora): every token is a target
        prompts = None
        batch = encode_pairs(tokenizer, [""] * len(rows), list(sub["text"]), max_length=max_length,
                             add_eos=False)
    batch = dict(batch)
    batch["index"] = torch.tensor(rows)
    if idk_answers is not None:
        if prompts is None:
            raise ValueError("idk/dpo objectives need a QA forget set (question/answer columns)")
        answers = [idk_answers[i] for i in _idk_choice(batch["index"], len(idk_answers))]
        batch["idk"] = dict(encode_pairs(tokenizer, prompts, answers, max_length=max_length))
    return batch


def _to(batch, device):
    return {k: (_to(v, device) if isinstance(v, dict) else v.to(device)) for k, v in batch.items()}


_shard = distributed.shard_rows   # rows rank::world of a batch (the name older callers use)


class Sampler:
    """Forget rows in shuffled epochs; retain rows cycled through shuffled passes. Seeded."""

    def __init__(self, n_forget, n_retain, batch_size, retain_batch_size, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.n_forget, self.n_retain = n_forget, n_retain
        self.batch_size, self.retain_batch_size = batch_size, retain_batch_size
        self._retain_queue: list[int] = []

    def epoch(self):
        order = torch.randperm(self.n_forget, generator=self.g).tolist()
        for start in range(0, self.n_forget, self.batch_size):
            yield order[start:start + self.batch_size]

    def retain(self):
        if not self.n_retain:
            return []
        while len(self._retain_queue) < self.retain_batch_size:
            self._retain_queue += torch.randperm(self.n_retain, generator=self.g).tolist()
        out, self._retain_queue = (self._retain_queue[:self.retain_batch_size],
                                   self._retain_queue[self.retain_batch_size:])
        return out


# ---------------------------------------------------------------- gradients
def _autocast(device, dtype):
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def _weight(term, args):
    return args[term.weight] if isinstance(term.weight, str) else term.weight


def step_units(terms, micro_batches, device, group=None) -> torch.Tensor:
    """Units (tokens or rows) of each term over the WHOLE step (all micro-batches, all ranks of
    `group`: one all_reduce for every term of the step), the normaliser of its loss."""
    units = torch.stack([sum(get_objective(t.objective).count(mb[t.source]) for mb in micro_batches)
                         .to(device).float() for t in terms]) if terms else torch.zeros(0, device=device)
    if group is not None:
        dist.all_reduce(units, group=group)
    return units.clamp(min=1)


def accumulate(model, params, terms, micro_batches, ctx, args, *, group=None, backward=True,
               weights=None, units=None, sharded=False, reduce_losses=True):
    """Sum of term weight * objective / (units of the whole step) over micro-batches (and ranks).

    Returns (gradient list or None, per-term mean losses as one 1-D tensor). With backward=False it
    only evaluates the losses (AutoLR probes). weights: each term's weight in the backward (default
    the term's own, Term.weight); units: the step's global units per term (default: step_units here).
    The gradient list holds the LOCAL tensors of `params` (lab.distributed.local): under DDP (group,
    not sharded) it is all-reduced here; sharded (FSDP2) gradients arrive reduce-scattered. With
    reduce_losses=False the losses stay this rank's partial sums (the caller all-reduces them)."""
    objectives = [get_objective(t.objective) for t in terms]
    device = distributed.local(params[0]).device
    if units is None:
        units = step_units(terms, micro_batches, device, group)
    term_losses = torch.zeros(len(terms), device=device)
    weights = [_weight(t, args) for t in terms] if weights is None else list(weights)
    if backward:
        for p in params:
            p.grad = None
    for mb in micro_batches:
        for i, (t, o) in enumerate(zip(terms, objectives)):
            with torch.set_grad_enabled(backward), _autocast(device, ctx.autocast_dtype):
                scaled = o.fn(model, mb[t.source], ctx).float() / units[i]
            if backward:  # backward each term at once: one term's activations alive at a time
                (scaled * weights[i]).backward()
            term_losses[i] += scaled.detach()
    if group is not None and reduce_losses:
        dist.all_reduce(term_losses, group=group)
    if not backward:
        return None, term_losses
    grads = [distributed.local(p.grad) if p.grad is not None else torch.zeros_like(distributed.local(p))
             for p in params]
    for p in params:
        p.grad = None
    if group is not None and not sharded:
        work = [dist.all_reduce(g, group=group, async_op=True) for g in grads]
        for w in work:
            w.wait()
    return grads, term_losses


def _group_loss(term_losses, terms, args, weights=None):
    if not terms:
        return torch.zeros((), device=term_losses.device)
    weights = [_weight(t, args) for t in terms] if weights is None else weights
    return (term_losses * torch.tensor(weights, device=term_losses.device)).sum()


# ---------------------------------------------------------------- AutoLR (NGDiff Alg. 1, METHODS §3)
def would_be_update(optimizer, params, d) -> list[torch.Tensor]:
    """The update per unit lr, D, that optimizer.step() would apply with gradient d (theta -= lr * D),
    computed from the optimizer state WITHOUT advancing it (the GeN reference code advances it).
    Weight decay is part of it: SGD's coupled d + wd * theta, AdamW's decoupled wd * theta."""
    if isinstance(optimizer, torch.optim.SGD):
        group = optimizer.param_groups[0]
        if group.get("momentum", 0):
            raise ValueError("AutoLR supports SGD without momentum (the engine's SGD)")
        wd = group["weight_decay"]
        return list(torch._foreach_add(list(d), [p.detach() for p in params], alpha=wd)) if wd else list(d)
    if not isinstance(optimizer, torch.optim.AdamW):
        raise ValueError(f"AutoLR supports AdamW and SGD, not {type(optimizer).__name__}")
    group = optimizer.param_groups[0]
    (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
    out = []
    for p, g in zip(params, d):
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1 if "step" in state else 1.0
        m = state["exp_avg"] * beta1 + g * (1 - beta1) if "exp_avg" in state else g * (1 - beta1)
        v = (state["exp_avg_sq"] * beta2 + g * g * (1 - beta2) if "exp_avg_sq" in state
             else g * g * (1 - beta2))
        denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
        out.append(m / (1 - beta1 ** step) / denom + wd * p.detach())
    return out


@torch.no_grad()
def autolr_probe(loss_fn, params, update, lr, loss_0, *, max_factor=None) -> dict:
    """Fit L_R(theta - s*D) = a s^2 + b s + c through s in (-lr, 0, +lr); lr* = slope/curvature =
    -b / (2a). Keep the old lr when curvature <= 0, slope <= 0 or the fit is not finite.
    With a schedule (warmup, linear decay) the probe runs at the step's scheduled lr and lr* is the lr
    applied at the probed step; the loop then sets its base lr to lr* / factor(step), so every later
    step applies lr* * factor(t) / factor(probed step) until the next probe (constant: lr* itself).
    Parameters are restored exactly (saved copy), so the probe leaves no trace."""
    saved = [p.detach().clone() for p in params]
    torch._foreach_add_(params, update, alpha=-lr)
    loss_minus = loss_fn()                      # L(theta - lr D): where the step goes
    torch._foreach_add_(params, update, alpha=2 * lr)
    loss_plus = loss_fn()                       # L(theta + lr D)
    for p, s in zip(params, saved):
        p.copy_(s)
    losses = torch.stack([loss_minus, torch.as_tensor(loss_0, device=loss_minus.device), loss_plus])
    l_minus, l_0, l_plus = losses.tolist()
    slope = (l_plus - l_minus) / (2 * lr)       # -b: decrease rate along -D
    curvature = (l_plus + l_minus - 2 * l_0) / lr ** 2   # 2a
    new_lr, accepted = lr, False
    if math.isfinite(slope) and math.isfinite(curvature) and curvature > 0 and slope > 0:
        new_lr, accepted = slope / curvature, True
        if max_factor:
            new_lr = min(new_lr, lr * max_factor)
    return {"autolr_probe": 1.0, "autolr_lr": new_lr, "autolr_accepted": float(accepted),
            "autolr_loss_minus": l_minus, "autolr_loss_0": l_0, "autolr_loss_plus": l_plus}


# ---------------------------------------------------------------- the loop
@dataclasses.dataclass
class LoopState:
    step: int = 0
    combiner_state: dict = dataclasses.field(default_factory=dict)
    trace: list = dataclasses.field(default_factory=list)
    # the pre-step weights (cos_update, on_update hooks): one parameter-size buffer reused every step,
    # because a fresh clone per step costs page faults (214 ms of a 13.8 s SmolLM2 step on CPU)
    param_buffer: list | None = dataclasses.field(default=None, repr=False)


# retain NLL measured on diagnostic steps of forget-only methods (for cos(g_f, g_r), A_r); not in d
DIAGNOSTIC_RETAIN = (Term("ce", "retain"),)


class Diverged(Exception):
    pass


@dataclasses.dataclass
class StepHooks:
    """Extension points of the one loop (used by ALKN's gradient sparsity and parameter modulation).

    on_direction(step, params, g_f, g_r, d) -> d   after combine + clip, before the optimizer: may
        read the gradients (e.g. update a mask score from G_u) and return a modified direction.
    on_update(step, params, before)                 after optimizer.step(), with the pre-step
        weights: may rewrite the realised update in place (mask it, scale it per element). `before`
        is a buffer the engine reuses next step: copy what must outlive the call.
    shards: the hooks take local shards (FSDP2) and sum what needs all entries over the group
        themselves (ALKN's, given the group); hooks without it are refused under --parallel fsdp.
    """
    on_direction: object = None
    on_update: object = None
    shards: bool = False


def make_context(model, method: Method, args, forget, tokenizer, cfg: UnlearnConfig, idk_answers):
    """Objective context for a run/task: frozen theta_0 copy and reference log-probs where needed."""
    needs = {n for t in (*method.forget, *method.retain) for n in get_objective(t.objective).needs}
    autocast_dtype = getattr(torch, cfg.autocast) if cfg.autocast else None
    ctx = ObjectiveContext(args=args, autocast_dtype=autocast_dtype)
    if "ref_model" in needs:
        ctx.ref_model = lora.base_copy(model).eval().requires_grad_(False)   # theta_0 without adapters
    if "rmu" in needs:
        g = torch.Generator().manual_seed(cfg.seed)
        u = torch.rand(model.config.hidden_size, generator=g)
        ctx.rmu_direction = u / u.norm()      # fixed random unit vector (WMDP RMU)
    if needs & {"ref_logprob", "ref_token_logprob"}:  # log-probs at theta_0 never change: compute once
        with lora.adapters_off(model):   # the base model's log-probs (LoRA's B = 0 gives the same at init)
            ctx.ref_logprob = _reference_logprobs(model, tokenizer, forget, cfg, idk_answers, autocast_dtype,
                                                  tokens="ref_token_logprob" in needs)
    return ctx


@torch.no_grad()
def _reference_logprobs(model, tokenizer, forget, cfg, idk_answers, autocast_dtype, tokens=False):
    """Log-probs at the starting weights, per forget row: sequence sums ("answer", "idk") and, with
    tokens=True, the per-token values ("answer_tokens": a [rows, max target tokens] tensor, 0-padded,
    aligned with the order of labelled positions) for objectives such as ALKN's ESL."""
    from lab.objectives import answer_token_logprobs, _forward
    was = model.training
    model.eval()
    out = {"answer": [], "idk": [], "answer_tokens": []}
    device = next(model.parameters()).device
    for start in range(0, len(forget), cfg.eval_batch_size):
        rows = range(start, min(start + cfg.eval_batch_size, len(forget)))
        batch = _to(encode_rows(tokenizer, forget, rows, max_length=cfg.max_length,
                                idk_answers=idk_answers), device)
        with _autocast(device, autocast_dtype):
            logp, mask = answer_token_logprobs(_forward(model, batch).logits, batch["labels"])
            out["answer"].append(logp.sum(1).float().cpu())
            if tokens:
                out["answer_tokens"] += [lp[m].float().cpu() for lp, m in zip(logp, mask)]
            if "idk" in batch:
                out["idk"].append(sequence_logprob(model, batch["idk"]).float().cpu())
    model.train(was)
    result = {k: torch.cat(v) for k, v in out.items() if v and k != "answer_tokens"}
    if tokens:
        result["answer_tokens"] = torch.nn.utils.rnn.pad_sequence(out["answer_tokens"], batch_first=True)
    return result


def trainable_parameters(model, method: Method, args) -> list[torch.nn.Parameter]:
    if method.trainable == "rmu":  # RMU trains only the MLP output projections of the chosen layers
        keep = {f"layers.{l}.mlp.down_proj.weight" for l in args["rmu_layers"]}
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.endswith(k) for k in keep))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {method.name!r}: no trainable parameters (check rmu_layers)")
    return params


def unlearning_loop(model, tokenizer, forget, retain, method: Method, args: dict, cfg: UnlearnConfig, *,
                    run=None, task=None, idk_answers=None, evaluate_fn=None, group=None,
                    progress=True, state: LoopState | None = None, hooks: StepHooks | None = None,
                    context: ObjectiveContext | None = None, parallel=None) -> LoopState:
    """Run cfg.epochs passes over `forget` (or cfg.max_steps steps) with `method`. Writes trace rows
    to `run` (if given) and calls evaluate_fn(step, epoch) every cfg.eval_every steps.
    parallel: a lab.distributed.Parallel (ddp / fsdp under a launcher; the model is sharded here under
    fsdp, after the objective context has its theta_0 copy); group: shorthand for ddp over a group."""
    if len(forget) == 0:
        raise ValueError("empty forget set: nothing to unlearn")
    if method.retain and len(retain) == 0:
        raise ValueError(f"method {method.name!r} needs retain data but the retain set is empty")
    par = parallel if parallel is not None else distributed.from_group(group)
    group, rank, world = par.group, par.rank, par.world
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    state = state or LoopState()
    model.train()
    args = fit_to_model(method, args, model)     # model-dependent defaults (RMU's layer)
    params = trainable_parameters(model, method, args)
    ctx = context or make_context(model, method, args, forget, tokenizer, cfg, idk_answers)
    if par.sharded and hooks is not None and not hooks.shards:
        raise ValueError("StepHooks under --parallel fsdp: these hooks see only this rank's shards of every "
                         "list and do not reduce over the group (StepHooks(shards=False)); use --parallel "
                         "ddp or none, or hooks built for shards (lab.alkn.ALKNHooks with group=)")
    if par.sharded:
        distributed.wrap(model, par, autocast=cfg.autocast)
        if getattr(ctx, "ref_model", None) is not None:
            distributed.wrap(ctx.ref_model, par, autocast=cfg.autocast)
        params = trainable_parameters(model, method, args)   # now the DTensor shards
    lr = resolved_lr(cfg)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(distributed.local_list(params), lr=lr, betas=cfg.betas,
                                      weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(distributed.local_list(params), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(forget) / cfg.batch_size)
    total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or 10 ** 12)

    def lr_factor(step):   # the schedule: linear warmup over warmup_steps, then constant or linear decay
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = max(0.0, 1 - step / total) if cfg.schedule == "linear" else 1.0
        return warm * decay

    if method.autolr and len(retain) == 0:
        raise ValueError(f"method {method.name!r}: AutoLR probes the retain loss, but the retain set is empty")
    sampler = Sampler(len(forget), len(retain) if (method.retain or cfg.diagnostics or method.autolr) else 0,
                      cfg.batch_size, cfg.retain_batch_size or cfg.batch_size, cfg.seed)
    mb = cfg.micro_batch_size or cfg.batch_size
    need_idk = any("idk" in get_objective(t.objective).needs for t in method.forget)
    rlw_gen = torch.Generator().manual_seed(cfg.seed + 1)
    base_lr = lr   # AutoLR resets it: lr at a step = base_lr * lr_factor(step) (autolr_probe's rule)
    bar = tqdm(total=total, desc=f"unlearn {method.name}" + (f" task {task}" if task is not None else ""),
               disable=not progress or rank != 0, leave=False)
    step_in_run = 0
    for epoch in range(cfg.epochs):
        for forget_rows in sampler.epoch():
            if step_in_run >= total:
                break
            retain_rows = sampler.retain()
            micro = []
            for i in range(0, max(len(forget_rows), 1), mb):
                f_rows = forget_rows[i:i + mb]
                r_rows = retain_rows[i * len(retain_rows) // len(forget_rows):
                                     (i + mb) * len(retain_rows) // len(forget_rows)] if retain_rows else []
                distributed.check_split(len(f_rows), world, f"step {state.step}: a forget micro-batch")
                if retain_rows:
                    distributed.check_split(len(r_rows), world, f"step {state.step}: a retain micro-batch")
                item = {"forget": encode_rows(tokenizer, forget, f_rows, max_length=cfg.max_length,
                                              idk_answers=idk_answers if need_idk else None)}
                if r_rows:
                    item["retain"] = encode_rows(tokenizer, retain, r_rows, max_length=cfg.max_length)
                micro.append(_to(distributed.shard_rows(item, rank, world), device))
            lr_now = base_lr * lr_factor(step_in_run)
            row = _step(model, params, optimizer, method, args, ctx, micro, state, cfg, lr_now,
                        rlw_gen=rlw_gen, group=group, sharded=par.sharded, hooks=hooks,
                        autolr_due=method.autolr and
                        step_in_run % args.get("autolr_every", 10) == 0)
            if "autolr_lr" in row:   # the probed lr is this step's; the schedule shapes the steps after it
                base_lr = row["autolr_lr"] / lr_factor(step_in_run)
                row["autolr_base_lr"] = base_lr
            row.update(step=state.step, epoch=epoch, task=task)
            state.trace.append(row)
            if run is not None and rank == 0:
                run.log_step(row)
            state.step += 1
            step_in_run += 1
            bar.update()
            bar.set_postfix(loss_f=f"{row['loss_f']:.3f}", loss_r=f"{row['loss_r']:.3f}")
            if evaluate_fn and cfg.eval_every and step_in_run % cfg.eval_every == 0 and step_in_run < total:
                evaluate_fn(state.step, epoch)
        if step_in_run >= total:
            break
    bar.close()
    state.param_buffer = None
    model.eval()
    return state


def _step(model, params, optimizer, method, args, ctx, micro, state, cfg, lr, *, rlw_gen, group,
          autolr_due, hooks=None, sharded=False) -> dict:
    """One optimizer step = steps 2-6 of the module docstring. `params`: the trainable parameters;
    the optimizer, the gradients and every list below hold their LOCAL tensors (lab.distributed.local:
    the shards under FSDP2, the parameters themselves otherwise). group: the data-parallel process
    group (None: one process); sharded: FSDP2 shards, whose dots and norms geometry sums over group."""
    local = distributed.local_list(params)
    geo_group = group if sharded else None
    diag = cfg.diagnostics > 0 and state.step % cfg.diagnostics == 0
    terms_f, terms_r = method.forget, method.retain
    # forget-only methods (GA, NPO, ...) still get the geometry on diagnostic steps: a retain NLL
    # gradient measured beside them (it does not enter d)
    probe_retain = not terms_r and diag and "retain" in micro[0]
    if probe_retain:
        terms_r = DIAGNOSTIC_RETAIN
    separate = method.separate_gradients or (diag and bool(terms_r))
    # 2. gradients
    g_f, g_r, d, losses_f, losses_r, w_r, units = _gradients(model, params, method, args, ctx, micro, state,
                                                             terms_f, terms_r, separate, group, sharded)
    loss_f, loss_r = _group_loss(losses_f, terms_f, args), _group_loss(losses_r, terms_r, args, w_r)
    scalars: dict[str, torch.Tensor] = {}
    with geometry.few_threads(local):
        # 3. combine (the retain weight lambda is applied here: g_r is of the unweighted objective)
        coef = None
        if separate:
            if probe_retain:
                d, info, coef = g_f, {}, (1.0, 0.0)
            else:
                d, info = combine(method, args, g_f, g_r, {"loss_f": loss_f, "loss_r": loss_r},
                                  state.combiner_state, generator=rlw_gen, group=geo_group)
                coef = direction_coefficients(method, args, info, state.combiner_state)
            scalars.update(info)
        # 4. modifiers: clip, then the hooks (ALKN's masks); the diagnostics describe the d they leave
        if cfg.max_grad_norm is not None:
            d, clip_info = geometry.clip_to_norm(d, cfg.max_grad_norm, group=geo_group)
            scalars.update(clip_info)
            coef = None if coef is None else tuple(c * clip_info["clip_scale"] for c in coef)
        if hooks is not None and hooks.on_direction is not None:
            d = hooks.on_direction(state.step, local, g_f if g_f is not None else d, g_r, d)
            coef = None
        if diag and g_r:
            scalars.update(geometry.alignment(g_f, g_r, d, group=geo_group, d_coef=coef))
        else:
            scalars["norm_d"] = geometry.norm(d, geo_group)
            if diag and g_f is not None:   # forget-only without retain data: one gradient
                scalars["norm_f"] = geometry.norm(g_f, geo_group) if d is not g_f else scalars["norm_d"]
    _check_finite(state.step, torch.cat([losses_f, losses_r]), scalars["norm_d"], (*terms_f, *terms_r))

    row = {}
    if autolr_due:  # 4b. NGDiff Alg. 1: probe L_R along the update (the retain NLL for forget-only methods)
        row.update(_autolr(model, params, optimizer, method, args, ctx, micro, d, lr,
                           loss_r if terms_r else None, units[len(terms_f):] if terms_r else None, group))
        lr = row["autolr_lr"]
    # 5. hand d to the optimizer (theta <- theta - lr * D(d)), then the realised-update diagnostics
    scalars.update(_apply(optimizer, local, d, lr, state, hooks, g_f, g_r, scalars,
                          track_update=diag and g_f is not None, group=geo_group))
    # 6. the trace row: the one host sync of the step's scalars
    names = list(scalars)
    values = torch.stack([torch.as_tensor(scalars[n], dtype=torch.float32).reshape(())
                          for n in names] + [loss_f.float(), loss_r.float()]).tolist()
    out = dict(zip(names, values))
    row.update(loss_f=values[-2], loss_r=values[-1] if terms_r else float("nan"), lr=lr)
    rename = {"norm_f": "grad_norm_f", "norm_r": "grad_norm_r"}
    row.update({rename.get(k, k): v for k, v in out.items()})
    return row


def _gradients(model, params, method, args, ctx, micro, state, terms_f, terms_r, separate, group, sharded):
    """Step 2: (g_f, g_r, d, per-term losses f, r (global), retain weights w_r). Separately: g_f of the
    weighted forget terms, g_r of sum_i w_i r_i, the UNWEIGHTED retain objective whenever the retain
    terms share one weight lambda (methods.retain_term_weights; combine applies lambda), d None.
    Else one gradient d = g_f + lambda g_r (weights in the backward). Two collectives for all the
    step's scalars here: the units of every term, then every term's loss."""
    device = distributed.local(params[0]).device
    if method.retain:
        _, w_r = retain_term_weights(method, args)
        lam = retain_weight(method, args, state.combiner_state)
    else:   # none, or the diagnostic retain NLL
        w_r, lam = [1.0] * len(terms_r), 1.0
    w_f = [_weight(t, args) for t in terms_f]
    units = step_units((*terms_f, *terms_r), micro, device, group)
    kw = dict(group=group, sharded=sharded, reduce_losses=False)
    n_f = len(terms_f)
    if separate:
        g_f, losses_f = accumulate(model, params, terms_f, micro, ctx, args, weights=w_f, units=units[:n_f], **kw)
        g_r, losses_r = (accumulate(model, params, terms_r, micro, ctx, args, weights=w_r, units=units[n_f:], **kw)
                         if terms_r else ([], torch.zeros(0, device=device)))
        d = None
    else:   # the weighted sum into one gradient: d = g_f + lambda g_r without materialising either
        d, losses = accumulate(model, params, (*terms_f, *terms_r), micro, ctx, args,
                               weights=[*w_f, *(lam * w for w in w_r)], units=units, **kw)
        losses_f, losses_r = losses[:n_f], losses[n_f:]
        g_f, g_r = (d if not terms_r else None), []
    losses = torch.cat([losses_f, losses_r])
    if group is not None:
        dist.all_reduce(losses, group=group)
    return g_f, g_r, d, losses[:n_f], losses[n_f:], w_r, units


def _check_finite(step, term_losses, norm_d, terms):
    # the one host sync before the update: losses and the direction's norm must be finite to go on
    finite = torch.isfinite(torch.cat([term_losses, norm_d.reshape(1)])).tolist()
    if not all(finite):
        names = [f"{t.objective}@{t.source}" for t in terms] + ["direction d"]
        bad = [n for n, ok in zip(names, finite) if not ok]
        raise Diverged(f"step {step}: non-finite {', '.join(bad)} "
                       f"(losses {dict(zip(names, term_losses.tolist()))})")


def _autolr(model, params, optimizer, method, args, ctx, micro, d, lr, loss_r, units_r, group):
    """AutoLR probe (NGDiff Alg. 1) of the retain objective (the unweighted one, as loss_r; the retain
    NLL for forget-only methods) along the update the optimizer would apply: trace entries incl. the
    lr for this step (autolr_lr). units_r: the step's retain units (the probes reuse them: one
    collective per probe, its losses)."""
    local = distributed.local_list(params)
    update = would_be_update(optimizer, local, d)
    probe_terms = method.retain or DIAGNOSTIC_RETAIN
    w_r = retain_term_weights(method, args)[1] if method.retain else [1.0]

    def retain_loss():
        losses = accumulate(model, params, probe_terms, micro, ctx, args, group=group, backward=False,
                            units=units_r)[1]
        return _group_loss(losses, probe_terms, args, w_r)
    return autolr_probe(retain_loss, local, update, lr, loss_r if loss_r is not None else retain_loss(),
                        max_factor=args.get("autolr_max_factor"))


def _apply(optimizer, local, d, lr, state, hooks, g_f, g_r, scalars, *, track_update, group):
    """Step 5: optimizer.step() with gradient d at this lr; the on_update hook; the realised-update
    cosines cos(-delta theta, g) (METHODS §7) when tracked."""
    for group_ in optimizer.param_groups:
        group_["lr"] = lr
    want_update = hooks is not None and hooks.on_update is not None
    before = None
    if track_update or want_update:
        if state.param_buffer is None:
            state.param_buffer = [torch.empty_like(p, memory_format=torch.preserve_format) for p in local]
        before = state.param_buffer
        with geometry.few_threads(local):
            torch._foreach_copy_(before, [p.detach() for p in local])
    for p, g in zip(local, d):
        p.grad = g
    optimizer.step()
    for p in local:
        p.grad = None
    if want_update:
        with torch.no_grad():
            hooks.on_update(state.step, local, before)
    if not track_update:
        return {}
    with geometry.few_threads(local):
        torch._foreach_sub_(before, [p.detach() for p in local])  # before := theta_old - theta_new
        return geometry.update_cosines(before, g_f, g_r or None, norm_f=scalars.get("norm_f"),
                                       norm_r=scalars.get("norm_r"), group=group)


# ---------------------------------------------------------------- run-level API
@dataclasses.dataclass
class UnlearnResult:
    run_dir: Path | None
    model: torch.nn.Module
    tokenizer: object
    metrics: dict
    trace: "pandas.DataFrame"
    config: dict


def resolved_lr(cfg: UnlearnConfig) -> float:
    """The lr a run uses: cfg.lr, or the model's DEFAULT_LR where it is None (what config.yaml records)."""
    return cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.model, DEFAULT_LR[None])


def _config_dict(cfg: UnlearnConfig, method: Method, args: dict, bench, extra=None) -> dict:
    out = dataclasses.asdict(cfg)
    out.update(kind="unlearn", method=method.name, method_args=args, combiner=method.combiner,
               forget_terms=[dataclasses.asdict(t) for t in method.forget],
               retain_terms=[dataclasses.asdict(t) for t in method.retain],
               benchmark=bench.name, benchmark_config=bench.config, protocol=None,
               lr=resolved_lr(cfg),
               trace_columns=runs.TRACE_COLUMNS, conventions=conventions(cfg, args, bench), **(extra or {}))
    return out


def conventions(cfg: UnlearnConfig, args: dict, bench=None) -> dict:
    """The scoring / objective conventions of a run (METHODS §1, §6), one block in every config.yaml:
    score_eos, forget_text_rows where the forget set is text (MUSE; None on QA), and each named option of
    lab.methods.CHOICES (kl_form, simnpo_margin, pcgrad_form) with the value the method used, or None where
    the method has no term it changes."""
    from lab.methods import CHOICES
    text = bench is not None and "text" in bench.forget.column_names
    return {"score_eos": cfg.score_eos, "forget_text_rows": cfg.forget_text_rows if text else None,
            **{name: args.get(name) for name in CHOICES}}


def load_starting_point(cfg: UnlearnConfig):
    """(model, tokenizer, benchmark, reference eval, initial eval, extra config) for a config.

    TOFU: the prepared target model (fine-tuned on forget + retain) and the retain model's evaluation
    as the forget-quality reference. MUSE-News: see _muse_prepared_start."""
    from lab.data import get_benchmark
    from lab.models import load_model
    if cfg.benchmark.startswith("tofu"):
        from lab.prepare import prepare
        prepared = prepare(model=cfg.model, benchmark=cfg.benchmark, benchmark_kwargs=cfg.benchmark_kwargs,
                           seed=cfg.seed, runs_root=cfg.runs_root, verbose=False, device=cfg.device,
                           **{"score_eos": cfg.score_eos, **cfg.prepare})
        model, tok = prepared.load("target", device=cfg.device)
        return (model, tok, prepared.benchmark, prepared.retain_eval, prepared.target_eval,
                {"prepared": str(prepared.path), "prepare_note": prepared.config.get("note", "")})
    muse = cfg.benchmark == "muse_news"
    if muse and (prepared := _muse_prepared_start(cfg)) is not None:
        return prepared
    bench = get_benchmark(cfg.benchmark, **cfg.benchmark_kwargs)
    model, tok = load_model(cfg.model, device=cfg.device, seed=cfg.seed)
    return model, tok, bench, None, None, {"retain_standin": bench.config.get("retain_standin"),
                                           **({"muse_starting_point": "model"} if muse else {})}


MUSE_STARTING_POINTS = ("auto", "prepared", "model")
MUSE_CPU_MAX_DOCS = 32   # auto on a CPU preset without max_docs: the forget articles its target is trained on


def _muse_prepared_start(cfg: UnlearnConfig):
    """MUSE-News, chosen by cfg.prepare["starting_point"] (recorded in config.yaml as muse_starting_point);
    None where the starting point is the model itself (load_starting_point's plain path):
    - "prepared": lab.prepare's target (the model fine-tuned on the benchmark's max_docs forget articles +
      the retain stand-in) and its retrain reference's evaluation (PrivLeak against it);
    - "model": `cfg.model` itself is the target (the MUSE target checkpoint on a GPU), no reference;
    - "auto" (default): "prepared" where a prepared entry exists for (model, options) - on a CPU preset
      without max_docs, the MUSE_CPU_MAX_DOCS entry - else "model". auto never starts a fine-tune (minutes on
      CPU): `lab prepare --benchmark muse_news` or starting_point "prepared" does.
    The reference is evaluated on the run's eval_limit rows (the rows the run scores); the target's own
    evaluation stays in the prepare run (lab.eval.restrict_eval is TOFU's), so no 'initial' record."""
    from lab import prepare as lab_prepare
    from lab.models import ALIASES, PRESETS
    options = dict(cfg.prepare)
    mode = options.pop("starting_point", "auto")
    if mode not in MUSE_STARTING_POINTS:
        raise ValueError(f"prepare.starting_point={mode!r}; valid: {', '.join(MUSE_STARTING_POINTS)}")
    kwargs = dict(cfg.benchmark_kwargs)
    preset = cfg.model in PRESETS or cfg.model in ALIASES
    if mode != "model" and preset and kwargs.get("max_docs") is None:
        kwargs["max_docs"] = MUSE_CPU_MAX_DOCS
    hparams = {"score_eos": cfg.score_eos, "eval_limit": cfg.eval_limit, **options}
    call = dict(model=cfg.model, benchmark=cfg.benchmark, benchmark_kwargs=kwargs, seed=cfg.seed, **hparams)
    if mode == "auto":
        mode = "prepared" if kwargs.get("max_docs") and lab_prepare.prepared_exists(**call) else "model"
    if mode == "model":
        return None
    prepared = lab_prepare.prepare(runs_root=cfg.runs_root, verbose=False, device=cfg.device, **call)
    model, tok = prepared.load("target", device=cfg.device)
    return (model, tok, prepared.benchmark, prepared.retain_eval, None,
            {"retain_standin": prepared.benchmark.config.get("retain_standin"), "muse_starting_point": "prepared",
             "prepared": str(prepared.path), "prepare_note": prepared.config.get("note", "")})


def unlearn(config: UnlearnConfig | dict | None = None, *, progress=True, **overrides) -> UnlearnResult:
    """Run one unlearning method end to end: starting model, loop, periodic + final evaluation, run dir."""
    from lab.data import forget_text_rows, idk_answers as load_idk
    from lab.eval import restrict_eval
    if isinstance(config, UnlearnConfig):
        cfg = dataclasses.replace(config, **overrides)
    else:
        cfg = UnlearnConfig(**{**(config or {}), **overrides})
    if cfg.nproc > 1 and not distributed.launched():   # e.g. a notebook's call: start the ranks, read the run
        run_dir = distributed.launch_run("unlearn", dataclasses.asdict(cfg), cfg.nproc, cfg.runs_root)
        rec = runs.load_run(run_dir)
        return UnlearnResult(run_dir, None, None, rec.summary.get("metrics", {}), rec.trace, rec.config)
    method, args = get_method(cfg.method, **cfg.method_args)
    par = distributed.setup(cfg.parallel, cfg.device)   # under a launcher: this rank's group and device
    if par.mode != "none":
        cfg = dataclasses.replace(cfg, device=par.device)
    model, tok, bench, reference, initial, extra = load_starting_point(cfg)
    # a text forget set (MUSE) as the rows the loop and the probes train on: max_length-token chunks by default
    bench = dataclasses.replace(bench, forget=forget_text_rows(tok, bench.forget, cfg.max_length, cfg.forget_text_rows))
    args = fit_to_model(method, args, model)     # the config records the model-dependent defaults
    if cfg.lora:   # the gradient lists become the adapter parameters (peft freezes the base)
        model = lora.wrap(model, cfg.lora, seed=cfg.seed)
    idk = load_idk() if any(t.objective in ("idk", "dpo") for t in method.forget) else None
    autocast_dtype = getattr(torch, cfg.autocast) if cfg.autocast else None
    config = {**_config_dict(cfg, method, args, bench, extra), "world_size": par.world}
    final: dict = {}
    t0 = time.time()
    # rank 0 writes the run; the other ranks' run records nothing
    with runs.create_run(config, root=cfg.runs_root) if par.is_writer else distributed.NullRun() as run:
        if initial is not None:  # the target's evaluation from lab.prepare = the starting point, on the
            initial = restrict_eval(initial, cfg.eval_limit, reference)   # rows every later record uses
            run.log_eval({"step": 0, "epoch": 0, "checkpoint": "initial", **initial["metrics"]},
                         rows=initial["rows"])

        def evaluate_fn(step, epoch):   # LoRA: on a merged copy, so training goes on unchanged after it
            res = distributed.evaluate(lora.merged_copy(model), tok, bench, par, reference=reference, limit=cfg.eval_limit,
                                       score_eos=cfg.score_eos, batch_size=cfg.eval_batch_size,
                                       autocast_dtype=autocast_dtype, progress=progress, **cfg.eval_options)
            if res is not None:   # rank 0 (or one process): the metrics of all rows
                run.log_eval({"step": step, "epoch": epoch, "checkpoint": "unlearned", **res["metrics"]},
                             rows=res["rows"])
                final.clear()
                final.update(res["metrics"])
            model.train()

        state = LoopState()
        try:
            unlearning_loop(model, tok, bench.forget, bench.retain, method, args, cfg, run=run,
                            idk_answers=idk, evaluate_fn=evaluate_fn, progress=progress, state=state,
                            parallel=par)
        except Diverged as e:   # every rank sees the same global losses and norm: all stop here
            distributed.save_pretrained(model, tok, run.path and run.path / "last_good", par)
            raise runs.RunStopped(f"{method.name} diverged: {e}. Trace so far and the last good weights "
                                  f"({run.path / 'last_good'}) are kept.", status="diverged") from None
        evaluate_fn(state.step, state.trace[-1]["epoch"] if state.trace else 0)
        final_model = lora.merged_copy(model)   # LoRA: W + BA as a plain model; otherwise the model
        if cfg.save_model:
            distributed.save_pretrained(final_model, tok, run.path and run.path / "model", par)
            if cfg.lora and par.is_writer:
                lora.save_adapter(model, run.path / "adapter")
        if cfg.probes:  # robustness probes on the final model: one more eval record each (lab.probes);
            from lab.probes import run_probes   # under a launcher on rank 0, on the whole model
            distributed.on_writer_whole(final_model, par, lambda whole: run_probes(
                whole, tok, cfg, run, bench=bench, step=state.step, progress=progress,
                epoch=state.trace[-1]["epoch"] if state.trace else 0))
        run.write_summary(metrics=final, steps=state.step, seconds=round(time.time() - t0, 2))
    import pandas as pd
    return UnlearnResult(run.path, model, tok, final, pd.DataFrame(state.trace), config)
