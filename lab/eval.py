"""Run the metrics of lab.metrics on a model: the TOFU suite and the MUSE-News suite (METHODS §6).

    result = evaluate(model, tokenizer, benchmark, reference=retain_result)
    result["metrics"]   # flat dict name -> float (forget_prob, forget_rouge, ..., model_utility, privleak)
    result["rows"]      # pandas.DataFrame of per-row outputs (set, row, question, answer, generation, ...)

`reference` is another evaluate() result (or the dict saved by lab.prepare) of the retain-trained
reference model: it supplies the forget truth ratios for forget quality and the MIA AUC for PrivLeak.

Throughput: a prompt's keys/values are computed once and reused for its answer, paraphrase and perturbed
answers, the tokens all prompts share (a chat template's system prompt) once per call, and targets are
scored sorted by length; generation is greedy decoding with continuous batching over a per-slot KV cache.
The numbers are those of the plain computation (tests/test_eval_speed.py)."""
from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import pandas as pd
import torch
from lab.progress import tqdm   # one line per bar when stderr is not a terminal

from lab import metrics
from lab.data import _pad_id, encode_pairs, encode_prompts, format_question

# Bump when a metric's definition or scoring convention changes: cached evaluations (lab.prepare) are
# keyed on it and recomputed (no fine-tune) under the new definitions.
EVAL_VERSION = 4   # 2: score_eos (answers scored with EOS by default); 3: EM, ES, Min-K%++, GradNorm, Reference
# 4: MUSE verbmem / knowmem EM and ES score the whole reference (prompt cut from the left, encode_pairs prompt_left)

# METHODS §6 generation lengths
MAX_NEW_TOKENS = {"tofu": 200, "verbmem": 128, "knowmem": 32}
TOFU_UTILITY_SETS = ("retain", "real_authors", "world_facts")


# ---------------------------------------------------------------- model primitives
def _autocast(model, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


@torch.no_grad()
def token_logprobs(model, tokenizer, prompts, targets, *, batch_size=16, max_length=512,
                   autocast_dtype=None, desc=None, progress=False, add_eos=False, stats=False,
                   truncate="right") -> list:
    """Log-prob of each target token given prompt + earlier target tokens (target tokens only).

    add_eos: each target is followed by the EOS token, scored as its last token (the score_eos
    convention, METHODS §6; a sequence cut at max_length loses its EOS first).
    truncate: lab.data.encode_pairs' rule for pairs longer than max_length ("right" | "prompt_left").
    Returns one 1-D float32 tensor per (prompt, target) pair, in input order.
    stats=True: one dict per pair instead, from the same logits: "logprob" (that tensor), "target" and
    "argmax" (token ids: the answer and the teacher-forced prediction, for EM / ES) and "z" (the
    Min-K%++ z-score of each target token, metrics.min_k_plus_plus_z). stats may also be one bool per
    pair (dicts for those pairs only).

    Each distinct prompt is computed once (its keys/values are reused for each of its targets: a
    question's answer, paraphrase and perturbed answers), and the tokens every prompt starts with (a
    chat template's system prompt) once per call. The start most of a prompt's targets share (TOFU's
    perturbed answers rewrite the answer's end: "The author's full name is ...") runs once, in its
    prompt's pass (_target_stem). Targets are then scored sorted by length, about batch_size * 64 target
    tokens per pass (short targets share a pass), logits taken at the scored positions only. The values
    are those of one plain forward per pair (tests).
    """
    device = next(model.parameters()).device
    want = [bool(s) for s in stats] if isinstance(stats, (list, tuple)) else [bool(stats)] * len(prompts)
    out: list = [torch.zeros(0)] * len(prompts)
    if not len(prompts):
        return out
    pairs = _pair_ids(encode_pairs(tokenizer, prompts, targets, max_length=max_length, add_eos=add_eos,
                                   truncate=truncate))
    groups: dict[tuple, list[int]] = {}
    for i, (p, t) in enumerate(pairs):
        if t:
            groups.setdefault(tuple(p), []).append(i)
    cut = [0] * len(pairs)           # target tokens of each pair that run in its prompt's pass (its stem)
    context = {(): ()}               # prompt -> prompt + the stem its targets share
    for p, idx in groups.items():
        if p:
            k, members = _target_stem([pairs[i][1] for i in idx])
            context[p] = p + tuple(pairs[idx[members[0]]][1][:k]) if members else p
            for m in members:
                cut[idx[m]] = k
    plan = _scoring_plan(groups, context, [len(t) - c for (_, t), c in zip(pairs, cut)], batch_size)
    shared = _common_prefix([list(p) for p in groups if p])
    cache = _PromptCache()
    if shared:
        with _autocast(model, autocast_dtype):
            cache.share_prefix(model, list(next(p for p in groups if p)[:shared]), device)
    bar = tqdm(total=sum(len(chunks) for _, chunks in plan), desc=desc, disable=not progress, leave=False)
    for block, chunks in plan:
        with _autocast(model, autocast_dtype):
            prompt_pass = (_prompt_pass(model, cache, [list(context[p]) for p in block],
                                        [len(context[p]) - len(p) for p in block], shared, device) if block[0] else None)
        where = {p: k for k, p in enumerate(block)}
        for idx in chunks:
            with _autocast(model, autocast_dtype):
                logits = _target_logits(model, cache, prompt_pass, [pairs[i][1][cut[i]:] for i in idx],
                                        [where[tuple(pairs[i][0])] for i in idx], [cut[i] for i in idx], device)
            _pick(logits, pairs, idx, want, out, device)
            bar.update(1)
    bar.close()
    for i, (p, t) in enumerate(pairs):   # nothing to score: empty tensors (and stats)
        if want[i] and not isinstance(out[i], dict):
            e = torch.zeros(0, dtype=torch.long)
            out[i] = {"logprob": out[i], "target": e, "argmax": e, "z": torch.zeros(0)}
    return out


TARGET_TOKENS_PER_ROW = 64    # a scoring pass holds up to batch_size * 64 (padded) target tokens ...
PROMPT_TOKENS_PER_ROW = 128   # ... after a block of prompts of up to batch_size * 128 (padded) tokens


def _scoring_plan(groups: dict, context: dict, lengths: list[int], batch_size: int) -> list:
    """[(block of distinct prompts, [chunk of pair indices, ...]), ...]: prompts sorted by the length of
    their pass (context[p]: the prompt and its targets' stem) into blocks (one prompt pass each; the empty
    prompt, whole texts, alone), each block's targets sorted by length (lengths[i]: pair i's tokens after
    the stem) into chunks (one target pass each) of at most batch_size * TARGET_TOKENS_PER_ROW padded
    tokens (at least one target; never fewer than batch_size targets of up to 64 tokens)."""
    plan, block = [], []
    blocks = [[()]] if () in groups else []
    for p in sorted((p for p in groups if p), key=lambda p: len(context[p])):
        if block and (len(block) + 1) * len(context[p]) > batch_size * PROMPT_TOKENS_PER_ROW:
            blocks.append(block)
            block = []
        block.append(p)
    blocks += [block] if block else []
    budget = max(1, batch_size) * TARGET_TOKENS_PER_ROW
    for block in blocks:
        idx = sorted((i for p in block for i in groups[p]), key=lambda i: lengths[i])
        chunks, cur = [], []
        for i in idx:   # ascending lengths: the newest target is the chunk's longest
            if cur and (len(cur) + 1) * lengths[i] > budget:
                chunks.append(cur)
                cur = []
            cur.append(i)
        chunks += [cur] if cur else []
        plan.append((block, chunks))
    return plan


def _target_stem(targets: list[list[int]]) -> tuple[int, list[int]]:
    """(k, members): the first k tokens that the targets `members` (positions in targets) all start with,
    chosen among the groups of targets with the same first token to save the most tokens ((members - 1)
    * k); each member keeps at least one token of its own. (0, []) where no two targets start alike."""
    by_first: dict[int, list[int]] = {}
    for j, t in enumerate(targets):
        by_first.setdefault(t[0], []).append(j)
    best = (0, [])
    for members in by_first.values():
        k = _common_prefix([targets[j] for j in members])
        if k and (len(members) - 1) * k > (len(best[1]) - 1) * best[0]:
            best = (k, members)
    return best


def _common_prefix(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own (0 for < 2)."""
    if len(seqs) < 2:
        return 0
    first, n = seqs[0], min(map(len, seqs)) - 1
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


class _PromptCache:
    """KV cache (duck-typed for HF's `cache=`) of the scoring passes. mode "prefix": store the keys/values
    of the tokens all prompts share; "prompts": a block of prompt rests runs after that prefix (each row
    prepends it) and each prompt's whole keys/values are stored; "targets": target rows run after their
    prompt's stored keys/values (`rows`: the block prompt of each target row)."""

    def __init__(self):
        self.prefix_k, self.prefix_v, self.k, self.v = [], [], [], []
        self.mode, self.rows = "prefix", None

    def share_prefix(self, model, prefix: list[int], device) -> None:
        self.begin("prefix")
        _forward_alone(model, self, prefix, device)

    def begin(self, mode: str, rows=None) -> None:
        self.mode, self.rows = mode, rows
        if mode == "prompts":
            self.k, self.v = [], []

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.mode == "prefix":
            self.prefix_k.append(key)
            self.prefix_v.append(value)
            return key, value
        if self.mode == "prompts":
            if self.prefix_k:
                n = key.shape[0]
                key = torch.cat([self.prefix_k[layer_idx].expand(n, -1, -1, -1), key], 2)
                value = torch.cat([self.prefix_v[layer_idx].expand(n, -1, -1, -1), value], 2)
            self.k.append(key)
            self.v.append(value)
            return key, value
        return (torch.cat([self.k[layer_idx][self.rows], key], 2),
                torch.cat([self.v[layer_idx][self.rows], value], 2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.mode == "prefix":
            return 0
        if self.mode == "prompts":
            return self.prefix_k[0].shape[2] if self.prefix_k else 0
        return self.k[0].shape[2] if self.k else 0


def _forward_alone(model, cache, ids: list[int], device) -> None:
    """One lone sequence (the prompts' shared start) into `cache`: positions 0.., causal mask."""
    n = len(ids)
    kw = dict(input_ids=torch.tensor([ids], device=device), position_ids=torch.arange(n, device=device)[None],
              attention_mask=_attention_mask(model, torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]))
    split = _decoder_and_head(model)   # only its keys/values are wanted: no head where it can be left out
    _decoded(split[0], cache, **kw) if split else _forward(model, cache, logits_to_keep=1, **kw)


def _left_padded(lengths: list[int], shared: int, device) -> tuple:
    """Mask, first own column and position ids of prompt rests of `lengths`, left-padded to the longest,
    after `shared` cached columns every row sees: (allowed [n, 1, width, shared + width], start [n],
    position_ids [n, width])."""
    width = max(lengths)
    start = torch.tensor([width - n for n in lengths], device=device)
    cols = torch.arange(width, device=device)
    allowed = (cols[:, None] >= cols[None, :]) & (cols[None, None, :] >= start[:, None, None])
    if shared:   # every row sees the shared prefix (padding rows too: no empty softmax)
        allowed = torch.cat([allowed.new_ones(len(lengths), width, shared), allowed], -1)
    else:
        allowed |= torch.eye(width, dtype=torch.bool, device=device)   # padding rows see themselves: no NaN
    return allowed[:, None], start, shared + (cols[None, :] - start[:, None]).clamp(min=0)


def _prompt_pass(model, cache, prompts: list[list[int]], stems: list[int], shared: int, device) -> dict:
    """Run a block of prompts (their first `shared` tokens already in the cache; the last stems[r] tokens of
    prompt r are its targets' stem) into the cache, left-padded so each ends at the last column:
    {"tail": each row's predictions at its last max(stems) + 1 columns (hidden states for a split model,
    else logits), "stem", "start": each prompt's first own column, "length": each prompt's length}."""
    rest = [p[shared:] for p in prompts]
    width = max(map(len, rest))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rest], device=device)
    allowed, start, positions = _left_padded(list(map(len, rest)), shared, device)
    cache.begin("prompts")
    kw = dict(input_ids=ids, attention_mask=_attention_mask(model, allowed), position_ids=positions)
    split, keep = _decoder_and_head(model), max(stems) + 1
    # split models keep hidden states: the head runs once per scored token, with the target passes' ones
    tail = (_decoded(split[0], cache, **kw)[:, -keep:] if split else
            model(**kw, **_cache_arg(model, cache), use_cache=True, logits_to_keep=keep).logits.float())
    return {"tail": tail, "stem": torch.tensor(stems, device=device), "start": start,
            "length": torch.tensor([len(p) for p in prompts], device=device), "shared": shared}


# Models whose logits are exactly head(decoder(...).last_hidden_state): scoring runs the head only at the
# scored positions (not at padding or at each target's last token, which predicts past it). Others (logit
# soft-capping or scaling, unknown layouts) take the plain forward's logits; the values are the same.
HEAD_AFTER_DECODER = ("llama", "mistral", "qwen2", "qwen3")


def _decoder_and_head(model):
    if getattr(model.config, "model_type", None) not in HEAD_AFTER_DECODER:
        return None
    decoder, head = getattr(model, model.base_model_prefix, None), model.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def _decoded(decoder, cache, **kw) -> torch.Tensor:
    """The decoder's last hidden states [n, width, hidden] of one pass through `cache` (None: no cache)."""
    return decoder(**kw, **_cached(decoder, cache)).last_hidden_state


def _cached(module, cache) -> dict:
    return dict(use_cache=True, **_cache_arg(module, cache)) if cache is not None else {"use_cache": False}


def _target_logits(model, cache, prompt_pass, targets: list[list[int]], row_prompt: list[int], cut: list[int], device):
    """Logits predicting every scored token ([tokens, vocab], float32, pair-major) of targets after the
    block prompts of `prompt_pass` (row_prompt[r]: the prompt of target r), with the prompts' stored
    keys/values. targets[r] is what follows its first cut[r] tokens: 0 (the whole target; its prompt's stem
    columns are masked out) or the prompt's stem (already in the prompt pass, whose predictions lead).
    prompt_pass None: whole texts (no prompt), whose first token is left unscored as a plain forward leaves it."""
    span = max(map(len, targets))
    ids = torch.tensor([t + [0] * (span - len(t)) for t in targets], device=device)
    cols = torch.arange(span, device=device)
    allowed = (cols[:, None] >= cols[None, :]).expand(len(targets), span, span)
    own = cols[None, :] < torch.tensor([len(t) - 1 for t in targets], device=device)[:, None]   # predict a later token
    if prompt_pass is None:
        return _logits_at(model, None, own, None, None, input_ids=ids, position_ids=cols[None, :].expand(len(targets), -1),
                          attention_mask=_attention_mask(model, allowed[:, None]))
    g, cut = torch.tensor(row_prompt, device=device), torch.tensor(cut, device=device)
    start, stem, shared = prompt_pass["start"][g], prompt_pass["stem"][g], prompt_pass["shared"]
    width = cache.k[0].shape[2] - shared
    prompt_cols = torch.arange(width, device=device)[None, :]
    seen = (prompt_cols >= start[:, None]) & (prompt_cols < width - stem[:, None] + cut[:, None])   # own prompt (+ stem)
    parts = [seen[:, None, :].expand(-1, span, -1), allowed]
    if shared:
        parts.insert(0, allowed.new_ones(len(targets), span, shared))
    # the prompt pass's predictions: at the prompt's last token, then at each stem token a target continues
    lead = cut + 1
    at = torch.repeat_interleave(g, lead)
    offset = torch.arange(int(lead.sum()), device=device) - torch.repeat_interleave(lead.cumsum(0) - lead, lead)
    col = prompt_pass["tail"].shape[1] - 1 - torch.repeat_interleave(stem, lead) + offset
    cache.begin("targets", rows=g)
    return _logits_at(model, cache, own, prompt_pass["tail"][at, col], lead, input_ids=ids,
                      attention_mask=_attention_mask(model, torch.cat(parts, -1)[:, None]),
                      position_ids=(prompt_pass["length"][g] - stem + cut)[:, None] + cols[None, :])


def _logits_at(model, cache, own, lead, lead_counts, **kw) -> torch.Tensor:
    """Logits (float32, [tokens, vocab]) of one pass at the positions `own` ([n, width] bool), row-major;
    with `lead` (rows predicting each row's first tokens, from _prompt_pass: lead_counts[r] for row r), each
    row's own positions follow its lead rows. Split models run the head at those rows only."""
    split = _decoder_and_head(model)
    if split:
        picked = _decoded(split[0], cache, **kw)[own]
    else:
        picked = model(**kw, **_cached(model, cache)).logits[own].float()
    if lead is not None:
        n = own.sum(1) + lead_counts                         # each row's scored tokens
        pos = torch.arange(int(n.sum()), device=picked.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
        is_lead = pos < torch.repeat_interleave(lead_counts, n)
        rows = picked.new_empty(len(is_lead), picked.shape[-1])
        rows[is_lead] = lead.to(rows.dtype)
        rows[~is_lead] = picked
        picked = rows
    return split[1](picked).float() if split else picked


def _pick(logits, pairs, idx, want, out, device) -> None:
    """Into out[i] for the pairs idx of one pass: the log-prob of each target token (and the stats dicts
    where want[i]) from that pass's target logits."""
    skip = [0 if pairs[i][0] else 1 for i in idx]   # no prompt: the first token has no prediction
    counts = [len(pairs[i][1]) - s for i, s in zip(idx, skip)]
    target = torch.tensor([x for i, s in zip(idx, skip) for x in pairs[i][1][s:]], device=device)
    lse = torch.logsumexp(logits, -1)
    picked = (logits.gather(1, target[:, None])[:, 0] - lse).cpu()
    for i, x in zip(idx, picked.split(counts)):
        out[i] = x
    rows = [k for k, i in enumerate(idx) if want[i]]
    if rows:
        keep = torch.repeat_interleave(torch.tensor([want[i] for i in idx]), torch.tensor(counts)).to(device)
        extra = _token_stats(logits[keep].sub_(lse[keep][:, None]), target[keep])
        for k, (tg, am, mu, var) in zip(rows, zip(*(t.split([counts[k] for k in rows]) for t in extra))):
            i = idx[k]
            z = metrics.min_k_plus_plus_z(out[i].numpy(), mu.numpy(), var.numpy())
            out[i] = {"logprob": out[i], "target": tg, "argmax": am, "z": torch.from_numpy(z.astype(np.float32))}


def _token_stats(logp, target):
    """At the scored target tokens (rows of log-probs over the vocabulary, a copy we own): target ids,
    argmax ids, and the mean and variance of log p under the next-token distribution (Min-K%++)."""
    sel = logp.clamp_(min=-1e4)   # the clamp keeps 0 * log 0 finite (exp(-1e4) = 0)
    argmax = sel.argmax(-1)
    p = sel.exp()
    mu = torch.einsum("nv,nv->n", p, sel)
    # centred E[(log p - mu)^2], in place: E[log^2 p] - mu^2 cancels badly in float32 for flat distributions
    var = torch.einsum("nv,nv->n", p, sel.sub_(mu[:, None]).square_())
    return target.cpu(), argmax.cpu(), mu.double().cpu(), var.double().cpu()


def _pair_ids(enc) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) of each row of an encode_pairs batch (its truncation and EOS included)."""
    out = []
    for ids, labels, mask in zip(enc["input_ids"], enc["labels"], enc["attention_mask"]):
        n = int(mask.sum())
        n_prompt = int((labels[:n] == -100).sum())
        seq = ids[:n].tolist()
        out.append((seq[:n_prompt], seq[n_prompt:]))
    return out


class _SlotCache:
    """KV cache of the decode loop (duck-typed for HF's `cache=`): per layer one preallocated
    [slots, kv_heads, capacity, head_dim] buffer. Slot j holds batch row j, its tokens in columns
    [start_j, length_j) (left padding before). A decode step writes each row's new key/value at that row's
    own column, so rows of different lengths share a batch, and a finished row's slot takes the next
    prompt (continuous batching) while the others stay where they are: no per-step concatenation.
    Columns [0, shared) of every slot hold the tokens all prompts start with (a chat template's system
    prompt), computed once (`share_prefix`); a prompt's own tokens follow after its padding."""

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.k, self.v = [], []
        self.rows = slice(0, 0)   # the slots this forward reads and writes
        self.cols = None          # decode: write column per row ([B] tensor); prefill: None (columns 0..q-1)
        self.width = 0            # decode: columns attention reads
        self.shared = 0           # columns [0, shared) of every slot: the common prefix

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx == len(self.k):  # first forward: allocate this layer's buffers
            shape = (self.slots, key.shape[1], self.capacity, key.shape[3])
            self.k.append(key.new_zeros(shape))
            self.v.append(value.new_zeros(shape))
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.cols is None:   # prefill: columns shared..shared+q-1, after the common prefix
            q, s = key.shape[2], self.shared
            k[self.rows, :, s:s + q], v[self.rows, :, s:s + q] = key, value
            return (key, value) if not s else (k[self.rows, :, :s + q], v[self.rows, :, :s + q])
        b = torch.arange(self.rows.start, self.rows.stop, device=key.device)
        k[b, :, self.cols], v[b, :, self.cols] = key[:, :, 0], value[:, :, 0]
        return k[self.rows, :, :self.width], v[self.rows, :, :self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.shared if self.cols is None else self.width - 1

    def share_prefix(self, model, prefix: list[int], device) -> None:
        """The keys/values of `prefix` into columns [0, len(prefix)) of every slot (one forward)."""
        n = len(prefix)
        self.rows, self.cols, self.shared = slice(0, 1), None, 0
        _forward_alone(model, self, prefix, device)
        for k, v in zip(self.k, self.v):
            k[1:, :, :n], v[1:, :, :n] = k[:1, :, :n], v[:1, :, :n]
        self.shared = n

    def move(self, src: int, dst: int, width: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :width], v[dst, :, :width] = k[src, :, :width], v[src, :, :width]


def _attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A 4-D mask HF passes through as is: bool for sdpa, additive float for eager and the others."""
    if model.config._attn_implementation == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _cache_arg(model, cache) -> dict:
    # transformers 5 names it `cache`, 4.x `past_key_values`
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _forward(model, cache, **kw):
    """Logits at the last position."""
    return model(**kw, **_cache_arg(model, cache), use_cache=True).logits[:, -1]


def _prefill(model, cache, seqs, first_slot, pad_id, device):
    """Prompt rests (after the cache's shared prefix), left-padded, into slots first_slot..; their first
    greedy token."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    allowed, _, positions = _left_padded(list(map(len, seqs)), cache.shared, device)
    cache.rows, cache.cols = slice(first_slot, first_slot + len(seqs)), None
    logits = _forward(model, cache, input_ids=ids, attention_mask=_attention_mask(model, allowed),
                      position_ids=positions, logits_to_keep=1)
    return logits.argmax(-1)


PREFILL_TOKENS = 1024   # padded prompt tokens per prefill pass: a refill of many prompts is cut by length


def _prefill_pieces(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` (descending) in runs of at most PREFILL_TOKENS padded tokens (>= 1 each):
    prompts of similar length share a prefill pass, so short ones are not padded to the longest."""
    pieces, cur = [], []
    for k, n in enumerate(lengths):
        if cur and (len(cur) + 1) * lengths[cur[0]] > PREFILL_TOKENS:
            pieces.append(cur)
            cur = []
        cur.append(k)
    return pieces + [cur] if cur else pieces


@torch.no_grad()
def greedy_decode(model, prompt_ids: list[list[int]], *, max_new_tokens: int, eos_token_id, pad_token_id=0,
                  batch_size: int = 16, autocast_dtype=None, desc=None, progress=False) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (EOS included when emitted), in input order.

    Continuous batching: up to batch_size rows decode together; a row leaves the batch at its EOS (or at
    max_new_tokens) and the next prompt takes its slot, so no step is spent on finished rows; the tokens
    all prompts start with are computed once (_SlotCache.share_prefix). Each row
    computes exactly what model.generate computes for it alone (same positions, masked padding); batch
    neighbours change float rounding only, which can flip a greedy choice only at a near-tie of logits."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompt_ids]
    if not prompt_ids or max_new_tokens < 1:
        return out
    queue = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # pop(): longest first
    slots = max(1, min(batch_size, len(prompt_ids)))
    cache = _SlotCache(slots, max(map(len, prompt_ids)) + max_new_tokens)
    rows, start, length = [], [], []   # per slot: row index, first column of its tokens, columns filled
    nxt = torch.zeros(slots, dtype=torch.long, device=device)   # each slot's token not yet in the cache
    shared = _common_prefix(prompt_ids)   # e.g. the chat template's system prompt: computed once
    bar = tqdm(total=len(prompt_ids), desc=desc, disable=not progress, leave=False)
    with _autocast(model, autocast_dtype):
        if shared:
            cache.share_prefix(model, prompt_ids[0][:shared], device)
        while queue or rows:
            if queue and len(rows) < slots:   # refill free slots from the queue
                new = [queue.pop() for _ in range(min(slots - len(rows), len(queue)))]
                for piece in _prefill_pieces([len(prompt_ids[i]) - shared for i in new]):   # longest first
                    seqs = [prompt_ids[new[k]][shared:] for k in piece]
                    nxt[len(rows):len(rows) + len(seqs)] = _prefill(model, cache, seqs, len(rows), pad_token_id, device)
                    width = len(seqs[0])
                    rows += [new[k] for k in piece]
                    start += [shared + width - len(s) for s in seqs]
                    length += [shared + width] * len(seqs)
            tokens = nxt[:len(rows)].tolist()   # the one host sync per step
            done = []
            for j, (i, t) in enumerate(zip(rows, tokens)):
                out[i].append(t)
                if t == eos_token_id or len(out[i]) >= max_new_tokens:
                    done.append(j)
            for j in reversed(done):   # the last slot's row moves into the hole
                last = len(rows) - 1
                if j != last:
                    cache.move(last, j, length[last])
                    nxt[j] = nxt[last]
                    rows[j], start[j], length[j] = rows[last], start[last], length[last]
                rows.pop(), start.pop(), length.pop()
            bar.update(len(done))
            if not rows:
                continue
            b, width = len(rows), max(length) + 1
            at = torch.tensor(length, device=device)
            first = torch.tensor(start, device=device)
            cols = torch.arange(width, device=device)
            allowed = (cols[None, :] >= first[:, None]) & (cols[None, :] <= at[:, None])
            if shared:
                allowed[:, :shared] = True
            cache.rows, cache.cols, cache.width = slice(0, b), at, width
            logits = _forward(model, cache, input_ids=nxt[:b, None],
                              attention_mask=_attention_mask(model, allowed[:, None, None]),
                              position_ids=(shared + at - first)[:, None])
            nxt[:b] = logits.argmax(-1)
            length = [n + 1 for n in length]
    bar.close()
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens, batch_size=16, max_length=512,
             autocast_dtype=None, desc=None, progress=False, stop=None) -> list[str]:
    """Greedy continuations (special tokens dropped, cut at EOS and at `stop` if given), in input order.
    Decoded by greedy_decode (continuous batching, batch_size rows at a time)."""
    enc = encode_prompts(tokenizer, prompts, max_length=max_length)
    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    new = greedy_decode(model, ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=_pad_id(tokenizer), batch_size=batch_size, autocast_dtype=autocast_dtype,
                        desc=desc, progress=progress)
    out = []
    for tokens in new:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if stop and stop in text:
            text = text[:text.index(stop)]
        out.append(text.strip())
    return out


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def gradnorm_scores(model, tokenizer, prompts, targets, *, max_length=512, autocast_dtype=None, desc=None,
                    progress=False) -> np.ndarray:
    """GradNorm MIA score per (prompt, target): mean over parameter tensors of the 2-norm of the gradient
    of the row's mean target NLL (target tokens without EOS, as Min-K%; METHODS §6).

    Per-sample gradients need one backward per row, so rows go one at a time (no padding either).
    Gradients come from torch.autograd.grad over every parameter (requires_grad switched on for the
    call), in eval mode: the model's .grad, requires_grad flags and train/eval mode are left as they were."""
    params = list(model.parameters())
    flags, was_training = [p.requires_grad for p in params], model.training
    device = params[0].device
    norms = []
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in tqdm(range(len(prompts)), desc=desc, disable=not progress, leave=False):
                enc = encode_pairs(tokenizer, [prompts[i]], [targets[i]], max_length=max_length, add_eos=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                with _autocast(model, autocast_dtype):
                    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                labels = enc["labels"][:, 1:]
                mask = labels != -100
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean()
                grads = [g for g in torch.autograd.grad(nll, params, allow_unused=True) if g is not None]
                norms.append(torch.stack(torch._foreach_norm(grads)).float())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    host = torch.stack(norms).cpu().numpy() if norms else np.zeros((0, 0))  # one transfer for all rows
    return np.array([metrics.gradnorm(row) for row in host])


# ---------------------------------------------------------------- TOFU
def _qa_set(model, tokenizer, ds, name, *, generate_answers, opts) -> pd.DataFrame:
    """Prob, ROUGE-L recall, truth ratio (and MIA scores) for one TOFU QA set."""
    questions, answers = list(ds["question"]), list(ds["answer"])
    prompts = [format_question(tokenizer, q) for q in questions]
    # score_eos (METHODS §6): every scored answer ends with EOS, counted in its mean NLL; Min-K% drops it
    eos = opts["score_eos"] and tokenizer.eos_token_id is not None
    score = dict(batch_size=opts["batch_size"], autocast_dtype=opts["autocast_dtype"],
                 progress=opts["progress"], add_eos=eos)
    # one scoring call: a question's answer, paraphrase and perturbed answers share one pass over its prompt
    pert = [list(p) for p in ds["perturbed_answer"]] if "perturbed_answer" in ds.column_names else []
    para = list(ds["paraphrased_answer"]) if pert and "paraphrased_answer" in ds.column_names else []
    flat_prompts = [p for p, ps in zip(prompts, pert) for _ in ps]
    flat_targets = [a for ps in pert for a in ps]
    n, n_para = len(answers), len(para)
    scored = token_logprobs(model, tokenizer, prompts + prompts[:n_para] + flat_prompts,
                            answers + para + flat_targets, desc=f"{name}: answers",
                            stats=[True] * n + [False] * (n_para + len(flat_targets)), **score)
    ans = scored[:n]
    ans_lp = [a["logprob"] for a in ans]
    rows = pd.DataFrame({
        "set": name, "row": list(ds["row"]) if "row" in ds.column_names else range(len(ds)),
        "question": questions, "answer": answers,
        "loss": [-_mean(t) for t in ans_lp],  # length-normalised NLL
        "n_tokens": [t.numel() for t in ans_lp],
    })
    rows["prob"] = np.exp(-rows["loss"])
    rows["min_k"] = [metrics.min_k_percent((t[:-1] if eos else t).numpy(), opts["mia_k"]) for t in ans_lp]
    _memorization_columns(rows, ans, opts, drop_last=eos)
    if opts["mia_gradnorm"] and name in MIA_SETS:  # per-sample backward: only where the AUC needs it
        rows["gradnorm"] = gradnorm_scores(model, tokenizer, prompts, answers, autocast_dtype=opts["autocast_dtype"],
                                           desc=f"{name}: gradnorm", progress=opts["progress"])
    # open-unlearning's zlib attack: mean answer NLL / compressed answer length (checked on its logs)
    rows["zlib"] = [metrics.zlib_score(l, a) for l, a in zip(rows["loss"], answers)]

    if pert:
        # truth ratio: paraphrased answer (or the answer itself where no paraphrase exists, as for
        # real authors / world facts) against every perturbed answer
        pert_lp = scored[n + n_para:]
        para_lp = scored[n:n + n_para] if n_para else ans_lp
        pert_mean, k = [], 0
        for ps in pert:
            pert_mean.append([_mean(t) for t in pert_lp[k:k + len(ps)]])
            k += len(ps)
        para_mean = np.array([_mean(t) for t in para_lp])
        rows["truth_ratio"] = [metrics.truth_ratio(pm, np.array(pl)) for pm, pl in zip(para_mean, pert_mean)]
        # normalised probability p_true / (p_true + sum p_perturbed) (METHODS §6, real authors / world)
        rows["prob_normalised"] = [
            math.exp(-l) / (math.exp(-l) + sum(math.exp(x) for x in pl))
            for l, pl in zip(rows["loss"], pert_mean)]

    if generate_answers:
        _generate_answers(model, tokenizer, [rows], opts)
    return rows


def _generate_answers(model, tokenizer, frames, opts) -> None:
    """Greedy answers and their ROUGE-L recall for QA-set frames, every prompt in ONE decode queue:
    continuous batching keeps the batch full across sets instead of draining it at each set's end."""
    prompts = [format_question(tokenizer, q) for f in frames for q in f["question"]]
    out = iter(generate(model, tokenizer, prompts, max_new_tokens=opts["max_new_tokens"],
                        batch_size=opts.get("gen_batch_size", opts["batch_size"]),
                        autocast_dtype=opts["autocast_dtype"], desc="generate", progress=opts["progress"]))
    for f in frames:
        f["generation"] = [next(out) for _ in range(len(f))]
        f["rouge"] = [metrics.rouge_l_recall(g, a) for g, a in zip(f["generation"], f["answer"])]


def evaluate_tofu(model, tokenizer, benchmark, reference=None, *, batch_size=16, max_new_tokens=None,
                  limit=None, mia_k=0.4, autocast_dtype=None, progress=True, score_eos=True, gen_batch_size=64,
                  **options) -> dict:
    """score_eos: answers scored with their EOS (default, TOFU / open-unlearning) or without (False).
    gen_batch_size: rows decoded together (continuous batching; the generations do not depend on it).
    options (METHODS §6, recorded in result["options"]): truth_ratio_aggregators {set: aggregator name}
    (defaults DEFAULT_TRUTH_RATIO_AGGREGATORS), privleak_score (the MIA score PrivLeak uses, "min_k"),
    mia_gradnorm (False skips GradNorm's per-sample backward), es_no_match ("zero" or "open_unlearning")."""
    opts = _eval_options(dict(batch_size=batch_size, max_new_tokens=max_new_tokens or MAX_NEW_TOKENS["tofu"],
                              mia_k=mia_k, autocast_dtype=autocast_dtype, progress=progress,
                              score_eos=bool(score_eos), gen_batch_size=gen_batch_size), **options)
    sets = benchmark.eval_sets
    need = ["forget", *TOFU_UTILITY_SETS, "holdout"]
    missing = [s for s in need if s not in sets]
    if missing:
        raise ValueError(f"benchmark {benchmark.name!r} lacks eval sets {missing}; has {sorted(sets)}")
    frames = []
    for name in need:
        ds = sets[name] if limit is None else sets[name].select(range(min(limit, len(sets[name]))))
        frames.append(_qa_set(model, tokenizer, ds, name, generate_answers=False, opts=opts))
    _generate_answers(model, tokenizer, [f for f, name in zip(frames, need) if name != "holdout"], opts)
    rows = pd.concat(frames, ignore_index=True)
    ref_eos = (reference.get("options") or {}).get("score_eos") if isinstance(reference, dict) else None
    if ref_eos is not None and ref_eos != opts["score_eos"]:
        raise ValueError(f"reference was scored with score_eos={ref_eos}, this evaluation with "
                         f"score_eos={opts['score_eos']}; evaluate both under the same convention")
    if reference is not None:
        rows["reference_score"] = _reference_scores(rows, reference)
    m = _tofu_metrics(rows, reference, opts)
    return {"benchmark": benchmark.name, "metrics": m, "rows": rows, "options": _recorded(opts)}


def score_tofu_rows(model, tokenizer, sets: dict, *, batch_size=16, autocast_dtype=None, progress=False,
                    score_eos=True, mia_k=0.4, **options) -> pd.DataFrame:
    """evaluate_tofu's per-row frame for `sets` ({set name: QA dataset}) without generation: the scored
    columns (loss, prob, truth ratio, MIA scores, EM / ES) only, ROUGE and generations left out. What a
    reference needs where it lacks rows (lab.prepare.reference_covering): forget quality and PrivLeak read
    truth ratios and MIA scores, never ROUGE. options: the recorded metric options (RECORDED_OPTIONS)."""
    opts = _eval_options(dict(batch_size=batch_size, max_new_tokens=None, mia_k=mia_k, autocast_dtype=autocast_dtype,
                              progress=progress, score_eos=bool(score_eos)), **options)
    was_training = model.training
    model.eval()
    try:
        frames = [_qa_set(model, tokenizer, ds, name, generate_answers=False, opts=opts) for name, ds in sets.items()]
    finally:
        model.train(was_training)
    return pd.concat(frames, ignore_index=True)


def _tofu_metrics(rows: pd.DataFrame, reference, opts) -> dict:
    by = {name: g for name, g in rows.groupby("set")}
    m: dict[str, float] = {}
    for name in ("forget", *TOFU_UTILITY_SETS):
        g = by[name]
        prob = g["prob_normalised"] if name in ("real_authors", "world_facts") else g["prob"]
        m[f"{name}_prob"] = float(prob.mean())
        m[f"{name}_rouge"] = float(g["rouge"].mean())
        m[f"{name}_truth_ratio"] = float(metrics.truth_ratio_aggregate(
            g["truth_ratio"].to_numpy(), opts["truth_ratio_aggregators"][name]))
    m["model_utility"] = float(metrics.model_utility(
        {f"{s}_{k}": m[f"{s}_{k}"] for s in TOFU_UTILITY_SETS for k in ("prob", "rouge", "truth_ratio")}))
    for key in ("exact_memorization", "extraction_strength"):
        m[f"forget_{key}"] = float(by["forget"][key].mean())
    # MIA: forget rows are members, holdout rows non-members (METHODS §6)
    m.update(_mia_aucs(by["forget"], by["holdout"]))
    m["mia_min_k"] = opts["mia_k"]
    if reference is not None:  # against the reference's values on the same rows (METHODS §6 "Same rows")
        ref_forget, ref_holdout = same_rows(reference, rows, MIA_SETS)
        m["forget_quality"] = float(metrics.forget_quality(by["forget"]["truth_ratio"].to_numpy(),
                                                           ref_forget["truth_ratio"].to_numpy()))
        m["privleak"] = _privleak(m, _mia_aucs(ref_forget, ref_holdout), opts["privleak_score"])
    return m


def same_rows(reference, rows: pd.DataFrame, sets) -> list[pd.DataFrame]:
    """The reference's per-row values for exactly the (set, row) pairs of `rows`, one frame per name in
    `sets`: a limited evaluation is compared with its reference on the same rows (METHODS §6 "Same
    rows"). A reference lacking some of them is an error (it was evaluated on fewer rows)."""
    ref_rows = _reference_parts(reference)[0]
    out = []
    for name in sets:
        want = rows.loc[rows["set"] == name, ["set", "row"]]
        got = want.merge(ref_rows[ref_rows["set"] == name], on=["set", "row"], how="left", indicator=True)
        missing = got[got["_merge"] == "left_only"]
        if len(missing):
            raise ValueError(f"reference lacks {len(missing)} of the {len(want)} evaluated {name!r} rows (first: "
                             f"row {missing['row'].iloc[0]}); evaluate the reference on at least the same rows")
        out.append(got.drop(columns="_merge"))
    return out


def restrict_eval(result: dict, limit: int | None, reference=None) -> dict:
    """A TOFU evaluate() result cut to the first `limit` rows of each eval set (the rows evaluate(limit=)
    selects), its metrics recomputed from those rows, with forget quality and PrivLeak against
    `reference` on the same rows. For a full evaluation (lab.prepare's) that is the starting point of
    a limited run. limit None keeps every row (metrics recomputed when a reference is given)."""
    if not str(result.get("benchmark", "")).startswith("tofu"):
        raise ValueError(f"restrict_eval: benchmark {result.get('benchmark')!r}; valid: TOFU evaluate() results")
    rows = result["rows"]
    if limit is not None:
        rows = rows[rows.groupby("set", sort=False).cumcount() < limit].reset_index(drop=True)
    elif reference is None:
        return result
    recorded = dict(result.get("options") or {})
    opts = _eval_options({"mia_k": recorded.pop("mia_k", result["metrics"].get("mia_min_k", 0.4))},
                         **{k: v for k, v in recorded.items() if k != "score_eos"})
    return {**result, "metrics": _tofu_metrics(rows, reference, opts), "rows": rows}


# ---------------------------------------------------------------- shared by both suites: EM / ES, MIA, options
MIA_SETS = ("forget", "holdout")  # TOFU members / non-members
MIA_COLUMNS = {s: "reference_score" if s == "reference" else s for s in metrics.MIA_SCORES}  # per-row column
DEFAULT_TRUTH_RATIO_AGGREGATORS = {"forget": "closer_to_1_better", "retain": "true_better",
                                   "real_authors": "true_better", "world_facts": "true_better"}


def _memorization_columns(rows: pd.DataFrame, stats: list[dict], opts, drop_last: bool) -> None:
    """EM, ES and Min-K%++ per row from token_logprobs(stats=True): answer tokens without the EOS
    (open-unlearning, checked on its logs: tests/test_metrics.py)."""
    cut = slice(None, -1) if drop_last else slice(None)
    rows["exact_memorization"] = [metrics.exact_memorization(s["argmax"][cut].numpy(), s["target"][cut].numpy())
                                  for s in stats]
    rows["extraction_strength"] = [metrics.extraction_strength(s["argmax"][cut].numpy(), s["target"][cut].numpy(),
                                                               no_match=opts["es_no_match"]) for s in stats]
    rows["min_k_plus_plus"] = [metrics.min_k_plus_plus(s["z"][cut].numpy(), opts["mia_k"]) for s in stats]


def _mia_aucs(members: pd.DataFrame, non: pd.DataFrame) -> dict:
    """mia_<score>_auc for every MIA score with per-row values on both sides (rows without one, e.g. no
    reference row, are left out on both sides alike)."""
    out = {}
    for score, col in MIA_COLUMNS.items():
        if col in members and col in non:
            a, b = members[col].dropna().to_numpy(), non[col].dropna().to_numpy()
            if len(a) and len(b):
                out[f"mia_{score}_auc"] = float(metrics.mia_auc(metrics.membership_score(score, a),
                                                                metrics.membership_score(score, b)))
    return out


def _privleak(m: dict, ref_metrics: dict, score: str) -> float:
    """PrivLeak on the MIA AUC of `score` (default min_k) against the reference model's. The reference's
    own Reference score is 0 on every row (itself minus itself): AUC 1/2."""
    key = f"mia_{score}_auc"
    ref_auc = ref_metrics.get(key, 0.5 if score == "reference" else None)
    if key not in m or ref_auc is None:
        side = "this evaluation" if key not in m else "the reference evaluation"
        raise ValueError(f"privleak_score={score!r}: {side} has no {key} (gradnorm needs mia_gradnorm=True, "
                         f"reference a reference); valid scores: {', '.join(metrics.MIA_SCORES)}")
    return privleak_or_nan(m[key], ref_auc)


def _reference_scores(rows: pd.DataFrame, reference) -> np.ndarray:
    """Reference MIA score per row: our mean answer NLL - the reference model's on the same (set, row);
    NaN where the reference has no such row or no loss (Same rows, METHODS §6)."""
    ref_rows = _reference_parts(reference)[0]
    if "loss" not in ref_rows:
        return np.full(len(rows), np.nan)
    ref = ref_rows.dropna(subset=["loss"]).drop_duplicates(["set", "row"]).set_index(["set", "row"])["loss"]
    ref_loss = ref.reindex(pd.MultiIndex.from_frame(rows[["set", "row"]])).to_numpy()
    return metrics.reference_score(rows["loss"].to_numpy(), ref_loss)


def _eval_options(base: dict, *, truth_ratio_aggregators=None, privleak_score="min_k", mia_gradnorm=True,
                  es_no_match="zero") -> dict:
    """base + the validated metric options of evaluate() (recorded in result["options"])."""
    aggs = dict(DEFAULT_TRUTH_RATIO_AGGREGATORS)
    for name, agg in (truth_ratio_aggregators or {}).items():
        if name not in aggs:
            raise ValueError(f"truth_ratio_aggregators: unknown set {name!r}; valid: {', '.join(aggs)}")
        if agg not in metrics.TRUTH_RATIO_AGGREGATORS:
            raise ValueError(f"truth_ratio_aggregators[{name!r}] = {agg!r}; valid: "
                             f"{', '.join(metrics.TRUTH_RATIO_AGGREGATORS)}")
        aggs[name] = agg
    if privleak_score not in metrics.MIA_SCORES:
        raise ValueError(f"privleak_score={privleak_score!r}; valid: {', '.join(metrics.MIA_SCORES)}")
    if privleak_score == "gradnorm" and not mia_gradnorm:
        raise ValueError("privleak_score='gradnorm' needs mia_gradnorm=True (it skips the GradNorm scores)")
    if es_no_match not in metrics.ES_NO_MATCH:
        raise ValueError(f"es_no_match={es_no_match!r}; valid: {', '.join(metrics.ES_NO_MATCH)}")
    return dict(base, truth_ratio_aggregators=aggs, privleak_score=privleak_score, mia_gradnorm=bool(mia_gradnorm),
                es_no_match=es_no_match)


def metric_options(**options) -> dict:
    """The metric options of evaluate() (truth_ratio_aggregators, privleak_score, mia_gradnorm, es_no_match),
    validated, defaults filled in: what UnlearnConfig.eval_options records in a run's config."""
    valid = ("truth_ratio_aggregators", "privleak_score", "mia_gradnorm", "es_no_match")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown evaluation options {unknown}; valid: {', '.join(valid)}")
    return _eval_options({}, **options)


RECORDED_OPTIONS = ("score_eos", "mia_k", "truth_ratio_aggregators", "privleak_score", "mia_gradnorm", "es_no_match")


def _recorded(opts: dict) -> dict:
    return {k: opts[k] for k in RECORDED_OPTIONS if k in opts}


def privleak_or_nan(auc: float, auc_reference: float) -> float:
    """metrics.privleak, NaN where it is undefined: a reference whose MIA AUC is exactly 1 (it separates
    forget from holdout perfectly, e.g. on a handful of rows). An evaluation reports it instead of failing."""
    return math.nan if auc_reference == 1 else float(metrics.privleak(auc, auc_reference))


def _reference_parts(reference):
    if isinstance(reference, dict) and "rows" in reference and "metrics" in reference:
        return reference["rows"], reference["metrics"]
    raise TypeError("reference must be an evaluate() result: a dict with 'metrics' and 'rows' "
                    "(e.g. lab.prepare(...).retain_eval)")


# ---------------------------------------------------------------- MUSE-News
def _knowmem_prompt(icl, question) -> str:
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in zip(icl["question"], icl["answer"]))
    return f"{shots}Question: {question}\nAnswer:"


def evaluate_muse(model, tokenizer, benchmark, reference=None, *, batch_size=16, limit=None, mia_k=0.4,
                  max_length=512, autocast_dtype=None, progress=True, score_eos=True, **options) -> dict:
    """VerbMem (ROUGE-L F1 of continuations), KnowMem forget/retain (ROUGE-L F1, ICL prompt), PrivLeak.

    MUSE prompts are raw text (no chat template), as in the MUSE benchmark. score_eos changes nothing
    here: MUSE scores generations and the Min-K% of raw texts (no answer, no EOS).
    EM / ES (teacher-forced) on verbmem and knowmem forget; MIA scores (loss, min_k, zlib, min_k_plus_plus,
    gradnorm, reference) on the privleak forget / holdout excerpts. options: as evaluate_tofu
    (privleak_score, mia_gradnorm, es_no_match; truth ratios do not exist here).
    """
    opts = _eval_options(dict(mia_k=mia_k, score_eos=bool(score_eos)), **options)
    sets = benchmark.eval_sets
    score = dict(batch_size=batch_size, max_length=max_length, autocast_dtype=autocast_dtype, progress=progress)

    def take(name):
        ds = sets[name]
        return ds if limit is None else ds.select(range(min(limit, len(ds))))

    gen = dict(batch_size=batch_size, max_length=max_length, autocast_dtype=autocast_dtype, progress=progress)
    frames, m = [], {}
    vm = take("verbmem")
    out = generate(model, tokenizer, list(vm["prompt"]), max_new_tokens=MAX_NEW_TOKENS["verbmem"],
                   desc="verbmem", **gen)
    f1 = [metrics.rouge_l_f1(o, t) for o, t in zip(out, vm["gt"])]
    frames.append(pd.DataFrame({"set": "verbmem", "row": range(len(vm)), "question": vm["prompt"],
                                "answer": vm["gt"], "generation": out, "rouge": f1}))
    m["verbmem_rouge_f1"] = float(np.mean(f1))
    _muse_memorization(model, tokenizer, frames[-1], list(vm["prompt"]), list(vm["gt"]), "verbmem", m, opts, score)
    for which in ("forget", "retain"):
        qa, icl = take(f"knowmem_{which}"), sets[f"knowmem_{which}_icl"]
        prompts = [_knowmem_prompt(icl, q) for q in qa["question"]]
        out = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS["knowmem"], stop="\n",
                       desc=f"knowmem {which}", **gen)
        f1 = [metrics.rouge_l_f1(o, a) for o, a in zip(out, qa["answer"])]
        frames.append(pd.DataFrame({"set": f"knowmem_{which}", "row": range(len(qa)),
                                    "question": qa["question"], "answer": qa["answer"],
                                    "generation": out, "rouge": f1}))
        m[f"knowmem_{which}_rouge_f1"] = float(np.mean(f1))
        if which == "forget":
            _muse_memorization(model, tokenizer, frames[-1], prompts, list(qa["answer"]), "knowmem_forget", m,
                               opts, score)
    # PrivLeak: membership scores on forget (members) vs holdout (non-members) excerpts, one scoring pass
    mia = {}
    for which in ("forget", "holdout"):
        texts = list(take(f"privleak_{which}")["text"])
        st = _text_logprobs(model, tokenizer, texts, stats=True, desc=f"privleak {which}", **score)
        lp = [s["logprob"] for s in st]
        rows = pd.DataFrame({"set": f"privleak_{which}", "row": range(len(texts)),
                             "question": [t[:200] for t in texts], "loss": [-_mean(t) for t in lp],
                             "n_tokens": [t.numel() for t in lp]})
        rows["min_k"] = [metrics.min_k_percent(t.numpy(), mia_k) for t in lp]
        rows["zlib"] = [metrics.zlib_score(l, t) for l, t in zip(rows["loss"], texts)]
        rows["min_k_plus_plus"] = [metrics.min_k_plus_plus(s["z"].numpy(), mia_k) for s in st]
        if opts["mia_gradnorm"]:
            bos = tokenizer.bos_token or ""
            rows["gradnorm"] = gradnorm_scores(model, tokenizer, [bos] * len(texts), texts, max_length=max_length,
                                               autocast_dtype=autocast_dtype, desc=f"privleak {which}: gradnorm",
                                               progress=progress)
        if reference is not None:
            rows["reference_score"] = _reference_scores(rows, reference)
        mia[which] = rows
        frames.append(rows)
    m.update(_mia_aucs(mia["forget"], mia["holdout"]))
    m["mia_min_k"] = mia_k
    if reference is not None:  # the reference's AUC on the same excerpts (METHODS §6 "Same rows")
        ref_aucs = _mia_aucs(*same_rows(reference, pd.concat([mia["forget"], mia["holdout"]]),
                                        ("privleak_forget", "privleak_holdout")))
        m["privleak"] = _privleak(m, ref_aucs, opts["privleak_score"])
    return {"benchmark": benchmark.name, "metrics": m, "rows": pd.concat(frames, ignore_index=True),
            "options": _recorded(opts)}


def _muse_memorization(model, tokenizer, rows, prompts, targets, name, m, opts, score) -> None:
    """Teacher-forced EM / ES (and Min-K%++) of a MUSE set's references; <name>_exact_memorization etc."""
    # prompt_left: a verbmem prompt + its 128-token reference can exceed max_length; cutting from the right
    # would leave one reference token (EM / ES of ~0 for every model)
    _memorization_columns(rows, token_logprobs(model, tokenizer, prompts, targets, stats=True, desc=f"{name}: EM/ES",
                                               truncate="prompt_left", **score), opts, drop_last=False)
    for key in ("exact_memorization", "extraction_strength"):
        m[f"{name}_{key}"] = float(rows[key].mean())


def _text_logprobs(model, tokenizer, texts, **kw):
    """Token log-probs of whole texts (every token after the first), via an empty-prompt pair."""
    bos = tokenizer.bos_token or ""
    return token_logprobs(model, tokenizer, [bos] * len(texts), texts, **kw)


# ---------------------------------------------------------------- entry point
def evaluate(model, tokenizer, benchmark, reference=None, **kwargs) -> dict:
    """Full evaluation suite for `benchmark` (TOFU-style or MUSE-News). See module docstring."""
    was_training = model.training
    model.eval()
    try:
        if benchmark.name.startswith("tofu"):
            return evaluate_tofu(model, tokenizer, benchmark, reference, **kwargs)
        if benchmark.name.startswith("muse"):
            return evaluate_muse(model, tokenizer, benchmark, reference, **kwargs)
        raise ValueError(f"no evaluation suite for benchmark {benchmark.name!r}; "
                         "valid: names starting with 'tofu' or 'muse'")
    finally:
        model.train(was_training)
