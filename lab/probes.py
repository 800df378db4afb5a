"""Robustness of forgetting (METHODS §8): does the knowledge come back?

    lab unlearn --method npo_gd --probes relearn,quant8,quant4,paraphrase,fewshot
    lab probe RUN --probes relearn          # later, on a run saved with --save-model

    from lab.engine import unlearn
    unlearn(method="npo_gd", probes=["relearn", "quant4"], probe_options={"relearn_steps": 20})

Each probe evaluates the FINAL model under one attack and writes one more evaluation record to the
run's eval.jsonl (checkpoint "probe:<name>") with its per-row outputs in eval_rows.parquet:

  relearn     k steps (relearn_steps, default 10) of answer NLL on the attack rows (the first
              relearn_fraction = 10 % of the forget rows, at least 1; relearn_data: "answers" or
              "paraphrased" questions) at the prepare fine-tune's lr, on a COPY of the model; then the
              HELD-OUT forget rows (every forget row but the attack rows) are evaluated. The same attack
              on the retain model gives the floor (what relearning alone brings a model that never saw
              the data).
  quant8/4    weight-only round-to-nearest quantization (symmetric, groups of quant_group_size = 128
              consecutive input columns of every nn.Linear weight but quant_skip = lm_head), on a copy,
              evaluated dequantized.
  paraphrase  the forget questions replaced by TOFU's paraphrased questions.
  fewshot     every forget question behind a prefix of fewshot_k (3) retain QA pairs.

Every record holds the evaluation's metrics of the probed model (forget_rouge, forget_prob, ...,
model_utility) plus, on the SAME forget rows: unlearned_*, target_* and floor_* (retain model; after the
attack for relearn) forget ROUGE-L / Prob, delta_* = probe - unlearned and the recovery fraction
recovery_* = (probe - unlearned) / (target - unlearned). relearn adds retain_before_* and
floor_recovery_* = (floor - retain_before) / (target - retain_before), the retain model's own gain.
Probes run on TOFU benchmarks (their forget sets are QA with paraphrased questions).
Under a launcher (--parallel ddp|fsdp) they run on rank 0 on the whole final model (lab.distributed.on_writer_whole).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pandas as pd
import torch

from lab import runs
from lab.data import qa_batches
from lab.eval import evaluate

PROBES = runs.PROBES
CHECKPOINT_PREFIX = runs.PROBE_PREFIX
# probe options (UnlearnConfig.probe_options); relearn_lr / relearn_batch_size None = the prepare fine-tune's
DEFAULTS = {"relearn_steps": 10, "relearn_fraction": 0.1, "relearn_data": "answers", "relearn_lr": None,
            "relearn_batch_size": None, "quant_group_size": 128, "quant_skip": ["lm_head"], "fewshot_k": 3}
RELEARN_DATA = ("answers", "paraphrased")
QUANT_BITS = {"quant8": 8, "quant4": 4}
COMPARED = ("rouge", "prob")            # forget metrics every record compares (forget_rouge, forget_prob)


def check_options(probes, options=None, benchmark: str | None = None) -> tuple[list[str], dict]:
    """(probe names, options with defaults filled) or a ValueError naming what is valid.
    probes: a list of names or one comma-separated string; benchmark: the run's (probes need TOFU)."""
    names = [p.strip() for p in probes.split(",")] if isinstance(probes, str) else list(probes or [])
    names = [p for p in names if p]
    bad = [p for p in names if p not in PROBES]
    if bad:
        raise ValueError(f"unknown probes {bad}; valid: {list(PROBES)}")
    if names and benchmark is not None and not str(benchmark).startswith("tofu"):
        raise ValueError(f"probes {names}: benchmark {benchmark!r}; probes run on TOFU benchmarks "
                         "(tofu_subset, tofu_forget01|05|10)")
    if len(set(names)) != len(names):
        raise ValueError(f"probes {names}: each probe at most once")
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown probe options {unknown}; valid: {sorted(DEFAULTS)}")
    out = {**copy.deepcopy(DEFAULTS), **options}
    if isinstance(out["quant_skip"], str):
        out["quant_skip"] = [s for s in out["quant_skip"].split(",") if s]
    for key in ("relearn_steps", "quant_group_size", "fewshot_k"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"probe option {key}={out[key]!r}; valid: an int >= 1")
    if not (isinstance(out["relearn_fraction"], (int, float)) and 0 < out["relearn_fraction"] < 1):
        raise ValueError(f"probe option relearn_fraction={out['relearn_fraction']!r}; valid: a number in (0, 1)")
    if out["relearn_data"] not in RELEARN_DATA:
        raise ValueError(f"probe option relearn_data={out['relearn_data']!r}; valid: {list(RELEARN_DATA)}")
    return names, out


# ---------------------------------------------------------------- quantization (pure)
def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Symmetric round-to-nearest weight quantization, dequantized: each output row of a [out, in] weight
    is cut into groups of `group_size` consecutive input columns (the last group may be shorter); a group
    with absolute maximum a has scale s = a / (2^(bits-1) - 1) and values s * round(w / s)."""
    if weight.ndim != 2:
        raise ValueError(f"quantize_rtn: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 16 or group_size < 1:
        raise ValueError(f"quantize_rtn: bits={bits}, group_size={group_size}; valid: bits 2..16, group_size >= 1")
    n_out, n_in = weight.shape
    qmax = 2 ** (bits - 1) - 1
    pad = (-n_in) % group_size                       # zero padding never changes a group's maximum
    w = torch.nn.functional.pad(weight.detach().float(), (0, pad)).reshape(n_out, -1, group_size)
    scale = w.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale).clamp_(-qmax, qmax)
    return (q * scale).reshape(n_out, -1)[:, :n_in].to(weight.dtype)


@torch.no_grad()
def quantize_model(model, bits: int, group_size: int = 128, skip=("lm_head",)) -> dict:
    """Replace (in place) every nn.Linear weight whose module name contains none of `skip` by its
    quantize_rtn value. Returns {quant_tensors, quant_params, quant_rel_error (||W_q - W|| / ||W||)}."""
    n_tensors = n_params = 0
    err = norm = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
            w = module.weight
            q = quantize_rtn(w, bits, group_size)
            err += float((q.float() - w.float()).pow(2).sum())
            norm += float(w.float().pow(2).sum())
            w.copy_(q)
            n_tensors += 1
            n_params += w.numel()
    return {"quant_tensors": n_tensors, "quant_params": n_params,
            "quant_rel_error": math.sqrt(err / norm) if norm else 0.0}


# ---------------------------------------------------------------- relearning attack
def split_forget(n_rows: int, fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """(attack positions, held-out positions) of a forget set of n_rows: the first max(1, floor(fraction *
    n_rows)) rows attack, every other row is held out."""
    n_attack = max(1, int(n_rows * fraction))
    if n_attack >= n_rows:
        raise ValueError(f"relearn: {n_rows} forget rows leave no held-out row after {n_attack} attack rows; "
                         "valid: a forget set of >= 2 rows and relearn_fraction < (n - 1) / n")
    return list(range(n_attack)), list(range(n_attack, n_rows))


def relearn(model, tokenizer, rows, *, steps: int, lr: float, batch_size: int, weight_decay: float = 0.0,
            seed: int = 0, max_length: int = 512, autocast_dtype=None, answer_key: str = "answer"):
    """A fine-tuned COPY of `model`: `steps` AdamW steps (constant lr, gradient clip 1.0 as lab.prepare)
    of the answer NLL on `rows` (question + answer_key columns), cycling through shuffled passes.
    Returns (copy in eval mode, per-step losses); `model` is left untouched."""
    attacked = copy.deepcopy(model)
    params = list(attacked.parameters())
    for p in params:
        p.requires_grad_(True)
    attacked.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device
    losses, epoch = [], 0
    torch.manual_seed(seed)
    while len(losses) < steps:
        for batch in qa_batches(tokenizer, rows, batch_size, shuffle=True, seed=seed + epoch,
                                max_length=max_length, answer_key=answer_key):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = attacked(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        epoch += 1
    attacked.eval()
    for p in params:
        p.grad = None
    return attacked, losses


# ---------------------------------------------------------------- prompt probes
def paraphrased(forget):
    """The forget rows with TOFU's paraphrased questions."""
    if "paraphrased_question" not in forget.column_names:
        raise ValueError(f"paraphrase probe: the forget set has no paraphrased_question column "
                         f"(columns {forget.column_names}); TOFU's *_perturbed forget files have it")
    return forget.remove_columns("question").rename_column("paraphrased_question", "question")


def fewshot_question(tokenizer, shots, question: str) -> str:
    """The question text that, through lab.data.format_question, asks `question` after the QA pairs
    `shots`. Without a chat template the prompt reads "Question: q1\\nAnswer: a1\\n\\n...Question: q\\nAnswer:";
    with one, the same text (shots included) is the user turn."""
    body = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}"
    # format_question wraps a plain prompt as "Question: <text>\nAnswer:": drop the first "Question: "
    return body if getattr(tokenizer, "chat_template", None) else body[len("Question: "):]


def with_fewshot(forget, tokenizer, retain, k: int):
    """The forget rows with every question behind the first k retain QA pairs."""
    if len(retain) < k:
        raise ValueError(f"fewshot probe: fewshot_k={k} but the retain set has {len(retain)} rows")
    shots = list(zip(retain["question"][:k], retain["answer"][:k]))
    return forget.map(lambda r: {"question": fewshot_question(tokenizer, shots, r["question"])})


# ---------------------------------------------------------------- evaluation on chosen forget rows
def _head(ds, limit):
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


def _evaluate(model, tok, bench, forget, cfg, reference):
    """lab.eval.evaluate of `model` with `forget` as the forget set and the other sets cut to eval_limit
    as the run's own evaluation; the reference restricted to the same forget rows."""
    sets = {name: _head(ds, cfg.eval_limit) for name, ds in bench.eval_sets.items() if name != "forget"}
    sets["forget"] = forget
    kw = {}
    if getattr(cfg, "eval_max_new_tokens", None):
        kw["max_new_tokens"] = cfg.eval_max_new_tokens
    ref = None
    if reference is not None:
        rows = reference["rows"]
        keep = (rows["set"] != "forget") | rows["row"].isin(list(forget["row"]))
        ref = {"metrics": reference["metrics"], "rows": rows[keep]}
    return evaluate(model, tok, dataclasses.replace(bench, eval_sets=sets), reference=ref, limit=None,
                    batch_size=cfg.eval_batch_size, progress=False,
                    autocast_dtype=getattr(torch, cfg.autocast) if cfg.autocast else None, **kw)


def forget_means(rows: pd.DataFrame | None, ids) -> dict | None:
    """{"rouge", "prob"}: means over the forget rows `ids` (the `row` column) of per-row outputs, or None
    when the rows do not cover every id."""
    if rows is None or rows.empty or "set" not in rows:
        return None
    f = rows[rows["set"] == "forget"].drop_duplicates("row", keep="last").set_index("row")
    ids = [int(i) for i in ids]
    if not ids or not set(ids) <= set(int(i) for i in f.index) or not set(COMPARED) <= set(f.columns):
        return None
    g = f.loc[ids]
    return {k: float(g[k].mean()) for k in COMPARED}


def recovery(after: float, unlearned: float, target: float) -> float:
    """(after - unlearned) / (target - unlearned) (METHODS §8); NaN when target == unlearned."""
    gap = target - unlearned
    return (after - unlearned) / gap if abs(gap) > 1e-12 else math.nan


def _last_rows(run_rows: pd.DataFrame, checkpoint: str) -> pd.DataFrame | None:
    if run_rows is None or run_rows.empty or "checkpoint" not in run_rows:
        return None
    r = run_rows[run_rows["checkpoint"] == checkpoint]
    for col in ("task", "step"):
        if col in r and r[col].notna().any():
            r = r[r[col] == r[col].max()]
    return r if len(r) else None


class _Appender:
    """log_eval for a finished run directory (lab probe RUN)."""

    def __init__(self, path):
        self.path = path

    def log_eval(self, record, rows=None):
        runs.append_eval(self.path, record, rows=rows)


def run_probes(model, tokenizer, cfg, run, *, bench=None, forget=None, step=0, epoch=0, task=None,
               progress=False) -> dict:
    """Run cfg.probes (with cfg.probe_options) on `model` and log one record each to `run` (a lab.runs.Run,
    or anything with .path and .log_eval(record, rows)). `forget`: the forget rows the model was meant to
    forget (default: the benchmark's forget eval set); `model` is never modified (attacks run on copies).
    Returns {probe: record}."""
    from lab.prepare import prepare
    names, opts = check_options(cfg.probes, cfg.probe_options, cfg.benchmark)
    if not names:
        return {}
    prepared = prepare(model=cfg.model, benchmark=cfg.benchmark, benchmark_kwargs=cfg.benchmark_kwargs,
                       seed=cfg.seed, runs_root=cfg.runs_root, verbose=False, device=cfg.device, **cfg.prepare)
    bench = bench or prepared.benchmark
    forget = forget if forget is not None else bench.eval_sets["forget"]
    reference = prepared.retain_eval
    run_rows = runs.load_run(run.path).rows
    rows_of = {"unlearned": _last_rows(run_rows, "unlearned"),
               "target": _last_rows(run_rows, "initial"),
               "target_prepared": prepared.target_eval["rows"], "retain": reference["rows"]}
    loaded = {}

    def means(which, ids, forget_rows):
        """forget means of the unlearned / target / retain model on rows ids, from saved per-row outputs
        where they cover the rows, else evaluated now."""
        sources = {"unlearned": ["unlearned"], "target": ["target", "target_prepared"], "retain": ["retain"]}
        for src in sources[which]:
            m = forget_means(rows_of[src], ids)
            if m is not None:
                return m
        if which == "unlearned":
            m_model = model
        else:
            if which not in loaded:
                loaded[which] = prepared.load(which, device=cfg.device)[0]
            m_model = loaded[which]
        return forget_means(_evaluate(m_model, tokenizer, bench, forget_rows, cfg, reference)["rows"], ids)

    autocast = getattr(torch, cfg.autocast) if cfg.autocast else None
    prep = {**prepared.config}
    out, settings = {}, {}
    base = {"step": step, "epoch": epoch, **({"task": task, "eval_task": None} if task is not None else {})}
    for name in names:
        extra: dict = {}
        if name == "relearn":
            attack_pos, held_pos = split_forget(len(forget), opts["relearn_fraction"])
            attack = forget.select(attack_pos)
            held = _head(forget.select(held_pos), cfg.eval_limit)
            if opts["relearn_data"] == "paraphrased":
                attack = paraphrased(attack)
            kw = dict(steps=opts["relearn_steps"], lr=opts["relearn_lr"] or prep["lr"],
                      batch_size=opts["relearn_batch_size"] or prep["batch_size"],
                      weight_decay=prep.get("weight_decay", 0.0), seed=cfg.seed, max_length=cfg.max_length,
                      autocast_dtype=autocast)
            attacked, losses = relearn(model, tokenizer, attack, **kw)
            res = _evaluate(attacked, tokenizer, bench, held, cfg, reference)
            del attacked
            if "retain" not in loaded:
                loaded["retain"] = prepared.load("retain", device=cfg.device)[0]
            retain_attacked, retain_losses = relearn(loaded["retain"], tokenizer, attack, **kw)
            floor = forget_means(_evaluate(retain_attacked, tokenizer, bench, held, cfg, reference)["rows"],
                                 held["row"])
            del retain_attacked
            ids = list(held["row"])
            before = means("retain", ids, held)
            extra = {"relearn_steps": kw["steps"], "relearn_lr": kw["lr"], "relearn_batch_size": kw["batch_size"],
                     "relearn_weight_decay": kw["weight_decay"], "relearn_data": opts["relearn_data"],
                     "relearn_rows": len(attack), "relearn_loss_first": losses[0], "relearn_loss_last": losses[-1],
                     "relearn_retain_loss_last": retain_losses[-1],
                     **{f"retain_before_forget_{k}": before[k] for k in COMPARED}}
            settings[name] = {**{k: v for k, v in extra.items() if k.startswith("relearn_")
                                 and "loss" not in k}, "attack_rows": [int(r) for r in attack["row"]],
                              "held_out_rows": [int(r) for r in held["row"]]}
            probe_forget = held
        else:
            probe_forget = _head(forget, cfg.eval_limit)
            ids = list(probe_forget["row"])
            if name in QUANT_BITS:
                quantized = copy.deepcopy(model)
                extra = {"quant_bits": QUANT_BITS[name], "quant_group_size": opts["quant_group_size"],
                         "quant_skip": ",".join(opts["quant_skip"]),
                         **quantize_model(quantized, QUANT_BITS[name], opts["quant_group_size"], opts["quant_skip"])}
                res = _evaluate(quantized, tokenizer, bench, probe_forget, cfg, reference)
                del quantized
                settings[name] = {k: extra[k] for k in ("quant_bits", "quant_group_size", "quant_skip")}
            else:
                asked = (paraphrased(probe_forget) if name == "paraphrase"
                         else with_fewshot(probe_forget, tokenizer, bench.retain, opts["fewshot_k"]))
                res = _evaluate(model, tokenizer, bench, asked, cfg, reference)
                extra = {"fewshot_k": opts["fewshot_k"]} if name == "fewshot" else {}
                settings[name] = dict(extra)
            floor = None
        probed = forget_means(res["rows"], ids)
        unl, tgt = means("unlearned", ids, probe_forget), means("target", ids, probe_forget)
        floor = floor or means("retain", ids, probe_forget)
        record = {**base, "checkpoint": CHECKPOINT_PREFIX + name, "probe": name, **res["metrics"],
                  "probe_rows": len(ids), **extra}
        for k in COMPARED:
            record.update({f"unlearned_forget_{k}": unl[k], f"target_forget_{k}": tgt[k],
                           f"floor_forget_{k}": floor[k], f"delta_forget_{k}": probed[k] - unl[k],
                           f"recovery_{k}": recovery(probed[k], unl[k], tgt[k])})
            if name == "relearn":
                record[f"floor_recovery_{k}"] = recovery(floor[k], extra[f"retain_before_forget_{k}"], tgt[k])
        run.log_eval(record, rows=res["rows"])
        out[name] = record
        if progress:
            print(f"probe {name}: forget_rouge {unl['rouge']:.3f} -> {probed['rouge']:.3f} "
                  f"(target {tgt['rouge']:.3f}, floor {floor['rouge']:.3f}, recovery {record['recovery_rouge']:.3f})",
                  flush=True)
    if hasattr(run, "write_summary"):
        run.write_summary(probes=settings)
    else:
        runs.update_summary(run.path, probes={**runs.load_run(run.path).summary.get("probes", {}), **settings})
    return out


# ---------------------------------------------------------------- lab probe RUN
def continual_forget(tasks, protocol: str):
    """The forget rows a continual run's final model was meant to forget: every task's (sequential,
    joint), the last task's (independent)."""
    from datasets import concatenate_datasets
    chosen = tasks[-1:] if protocol == "independent" else tasks
    return concatenate_datasets([t.remove_columns("task") if "task" in t.column_names else t for t in chosen])


def probe_run(path, probes, options=None, *, device="cpu", progress=True) -> dict:
    """Run probes on a finished run saved with save_model (its <run>/model), appending the records."""
    from pathlib import Path
    from lab.models import load_model
    path = Path(path)
    rec = runs.load_run(path)
    cfg_raw = rec.config
    kind = cfg_raw.get("kind")
    if kind not in ("unlearn", "continual"):
        raise ValueError(f"lab probe: {path} is a {kind!r} run; probes run on 'unlearn' and 'continual' runs")
    if not (path / "model").is_dir():
        raise FileNotFoundError(f"lab probe: {path} has no saved model ({path / 'model'}); rerun it with "
                                "--save-model, or pass --probes to lab unlearn / lab continual")
    names, opts = check_options(probes, options)
    if kind == "continual":
        from lab.continual import ContinualConfig as Config
    else:
        from lab.engine import UnlearnConfig as Config
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{**{k: v for k, v in cfg_raw.items() if k in fields}, "probes": names, "probe_options": opts,
                    "device": device})
    model, tok = load_model(str(path / "model"), device=device)
    from lab.data import benchmark_from_config
    bench = benchmark_from_config(cfg_raw["benchmark_config"])
    ev = rec.evals
    last = ev[ev["checkpoint"] == "unlearned"] if not ev.empty and "checkpoint" in ev else ev
    last = last.iloc[-1].to_dict() if len(last) else {}
    forget, task = None, None
    if kind == "continual":
        from lab.continual import continual_tasks
        tasks = continual_tasks(bench, cfg.n_tasks, cfg.task_unit)
        forget, task = continual_forget(tasks, cfg.protocol), len(tasks) - 1
    step = int(last.get("step", 0)) if pd.notna(last.get("step", 0)) else 0
    epoch = int(last.get("epoch", 0)) if pd.notna(last.get("epoch", 0)) else 0
    return run_probes(model, tok, cfg, _Appender(path), bench=bench, forget=forget, step=step, epoch=epoch,
                      task=task, progress=progress)


# ---------------------------------------------------------------- claim lines (notebooks)
SURVIVES = {"relearn": "a relearning attack on 10% of the forget rows", "quant8": "8-bit weight quantization",
            "quant4": "4-bit weight quantization", "paraphrase": "paraphrased questions",
            "fewshot": "a few-shot prefix of retain QA pairs"}


def robustness_claims(table: pd.DataFrame, threshold: float = 0.1, metric: str = "rouge", labels=None,
                      min_gap: float = 0.05, min_utility_kept: float = 0.5) -> list[dict]:
    """One computed claim line per row of lab.runs_views.robustness_table ("<method>: forgetting survives
    4-bit weight quantization: recovery <= 0.1"), through lab.experiments.claim. Not testable where the
    run did not forget (target - unlearned < min_gap on the probe's rows), the recovery is undefined, or
    the probe broke the model (its model utility below min_utility_kept x the unlearned model's: 4-bit
    SmolLM2-135M scores MU 0, and nothing coming back from a broken model says nothing about forgetting).
    labels: {run_id: name to print} (default: the table's labels)."""
    from lab.experiments import claim
    out = []
    for _, r in table.iterrows():
        name = (labels or {}).get(r["run_id"], r["label"])
        what = SURVIVES.get(r["probe"], r["probe"])
        text = f"{name}: forgetting survives {what} (recovery of forget {metric} <= {threshold:g})"
        unl, after, tgt = (r[f"{w}forget_{metric}"] for w in ("unlearned_", "", "target_"))
        rec, floor = r[f"recovery_{metric}"], r[f"floor_forget_{metric}"]
        values = [unl, after, tgt, rec]
        if any(v is None or pd.isna(v) for v in values):
            out.append(claim(text, None, "no recovery value (nothing forgotten on these rows, or a probe failed)"))
            continue
        detail = (f"forget {metric} {unl:.3f} unlearned -> {after:.3f} under the probe (target {tgt:.3f}, "
                  f"retain model {floor:.3f}); recovery {rec:.3f}")
        if r["probe"] == "relearn" and pd.notna(r.get(f"floor_recovery_{metric}")):
            detail += f"; the same attack gives the retain model {r[f'floor_recovery_{metric}']:.3f} of its own gap"
        # MU beside the forget score: a probe that lowers both damaged the model rather than confirming forgetting
        mu, probe_mu = r.get("model_utility"), r.get("probe_model_utility")
        known_mu = mu is not None and probe_mu is not None and pd.notna(mu) and pd.notna(probe_mu)
        if known_mu:
            detail += f"; model utility {mu:.3f} -> {probe_mu:.3f} under the probe"
        broken = known_mu and probe_mu < min_utility_kept * mu
        forgot = tgt - unl >= min_gap
        holds = None if not forgot or broken else rec <= threshold
        if not forgot:
            detail = f"the run did not forget these rows (target - unlearned < {min_gap}); " + detail
        elif broken:
            detail = (f"the probe broke the model (model utility under the probe below {min_utility_kept:g} x "
                      "the unlearned model's); " + detail)
        out.append(claim(text, holds, detail))
    return out


def robustness_view(table: pd.DataFrame, labels=None) -> pd.DataFrame:
    """The notebooks' robustness table: one row per (run, probe), forget ROUGE-L and Prob unlearned /
    under the probe / target / retain floor, and the recovery fractions. labels: {run_id: name}."""
    if table.empty:
        return pd.DataFrame()
    cols = {"probe_rows": "rows"}
    for k, name in (("rouge", "ROUGE"), ("prob", "Prob")):
        cols.update({f"unlearned_forget_{k}": f"{name} unlearned", f"forget_{k}": f"{name} probed",
                     f"target_forget_{k}": f"{name} target", f"floor_forget_{k}": f"{name} retain floor",
                     f"recovery_{k}": f"{name} recovery"})
    out = table.assign(run=[(labels or {}).get(r, l) for r, l in zip(table["run_id"], table["label"])])
    return out.set_index(["run", "probe"])[list(cols)].rename(columns=cols)
