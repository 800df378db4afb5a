"""Distribution, all in one place (METHODS §9): process groups from the launcher's environment, the
sampling split, wrapping for DDP / FSDP2, gathers and rank-0 writes.

    torchrun --nproc_per_node 2 -m lab unlearn --parallel fsdp --method gru_npo_gd ...
    accelerate launch --num_processes 2 -m lab unlearn --parallel ddp ...   (sets the same environment)

The engine, geometry, ALKN and eval see a process `group` (None in one process) and LOCAL tensors
(`local`: a DTensor's shard, any other tensor itself), nothing more.

Modes
  none  one process (the default; no launcher needed).
  ddp   replicated weights. The engine all-reduces each ACCUMULATED gradient list (g_f, then g_r) once
        per step: the traffic of torch DDP under no_sync over micro-batches, without its wrapper,
        which would all-reduce inside every backward and knows only one gradient.
  fsdp  torch FSDP2 `fully_shard` per decoder layer + the root (embeddings, norm, head); gradients
        are reduce-scattered as SUMS (divide factor 1: the losses are already normalised by the
        global units of the step) and stay shards. Every dot/norm of the geometry is the sum of local
        partial sums, all-reduced (lab.geometry's group=). On CUDA: MixedPrecisionPolicy(bf16 params,
        fp32 reduce) when autocast is bfloat16.

Sampling: every rank draws the same global batch from the seed and keeps rows rank::world of each
micro-batch (`shard_rows`), so no two ranks see the same row and the same seed + global batch give
the same rows at any world size.

Evaluation (`evaluate`): under FSDP on an unsharded copy of the model (no collective runs inside the
evaluation then, whatever each rank's rows need); TOFU rows are split across ranks and the per-row frames gathered on rank 0, which
computes the metrics from all rows; other suites run on rank 0 alone. Run files are written by rank 0
only (`is_writer`); a failing rank stops every rank with its message (`run_all_or_none`).
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

MODES = ("none", "ddp", "fsdp")


def local(t):
    """The local tensor of a DTensor (FSDP2's shard of a parameter or gradient), else t itself. The
    same object on every call, so an optimizer over local tensors keeps its state keys."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def local_list(params):
    return [local(p) for p in params]


@dataclasses.dataclass
class Parallel:
    """How this process takes part: mode, the process group (None: one process), rank, world size,
    local rank and the device the launcher gives it."""
    mode: str = "none"
    group: object = None
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun / accelerate launch (the torch.distributed environment is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_run(command: str, config: dict, nproc: int, runs_root) -> Path:
    """`lab <command> --config <config>` (unlearn / continual) in `nproc` ranks started by torchrun on this
    machine, from a process that is not under a launcher (a notebook's engine call, a script): the run
    directory it wrote. The ranks' output streams through; a run stopped as a result (diverged) raises
    lab.runs.RunStopped as in one process, any other failure RuntimeError with the ranks' last lines."""
    import collections
    import subprocess
    import sys
    import tempfile

    import yaml

    from lab import runs
    root = Path(runs_root)
    before = set(runs.find_runs(root))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    if runs.current_experiment():   # the notebook's experiment tag reaches the ranks' config.yaml
        env[runs.EXPERIMENT_ENV] = runs.current_experiment()
    tail, said = collections.deque(maxlen=40), []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "config.yaml"
        spec.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lab", command, "--config", str(spec), "--runs", str(root)]
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                print(line, end="", flush=True)
                tail.append(line)
                # the CLI's message per rank, and a rank's abort (its lines scroll away under torchrun's report)
                if line.startswith((f"lab {command}: error:", *RANK_DIED)) and line not in said:
                    said.append(line)
    new = new_runs(root, before, command)
    if proc.returncode == 0 and len(new) == 1:
        return new[0]
    stopped = runs.load_run(new[-1]).summary if new else {}
    if stopped.get("status") == "diverged":
        raise runs.RunStopped(stopped.get("error", "diverged"), status="diverged")
    cli_said = any(line.startswith(f"lab {command}: error:") for line in said)
    raise RuntimeError(f"lab {command} under torchrun with {nproc} ranks failed (exit {proc.returncode}, "
                       f"{len(new)} new {command} runs under {root}): " + "".join(said)
                       + ("" if cli_said else "last lines:\n" + "".join(tail)))


_JOINED = False   # setup() initialised the process group (finish() ends it; a group a caller made is theirs)


def new_runs(root, before, kind: str) -> list:
    """The run directories of `kind` under root not in `before`: a launched command's own run (a prepare
    run it had to write first, for a model not yet in the cache, lies beside it)."""
    from lab import runs
    return [d for d in runs.find_runs(root) if d not in before and runs.load_run(d).config.get("kind") == kind]


RANK_DIED = ("terminate called", "Fatal Python error", "Segmentation fault")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def setup(mode: str = "none", device: str = "cpu") -> Parallel:
    """The Parallel for `mode`: joins the launcher's process group (nccl on CUDA, gloo on CPU; device
    cuda:LOCAL_RANK on a GPU machine). mode "none" under a launcher with several ranks is refused (every
    rank would run the whole job and write its own run)."""
    global _JOINED
    if mode not in MODES:
        raise ValueError(f"--parallel {mode!r}; valid: {', '.join(MODES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if launched() and world > 1:
            raise ValueError(f"started by a launcher with WORLD_SIZE={world} but --parallel none: "
                             "pass --parallel ddp or --parallel fsdp")
        return Parallel(device=device)
    if not launched() and not dist.is_initialized():
        os.environ.setdefault("RANK", "0")         # a one-process "launch": world size 1, same code path
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        # rank-0-only work (probes, MUSE evaluation, checkpoint writes) can outlast nccl's 10-minute default
        # while the other ranks wait in a collective
        minutes = float(os.environ.get("LAB_DIST_TIMEOUT_MIN", "60"))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
        # a process leaving with its group alive can abort at exit (gloo's worker threads are torn down with
        # the interpreter: "terminate called without an active exception", SIGABRT after a finished run)
        atexit.register(_destroy_at_exit)
        _JOINED = True
    group = dist.group.WORLD
    return Parallel(mode, group, dist.get_rank(group), dist.get_world_size(group), local_rank, device)


def from_group(group, mode="ddp") -> Parallel:
    """A Parallel for an already initialised process group (tests, notebooks)."""
    if group is None:
        return Parallel()
    return Parallel(mode, group, dist.get_rank(group), dist.get_world_size(group))


def teardown(par: Parallel | None, timeout_s: float = 600.0, wait: bool = True):
    """The clean end of a process in a group: every rank waits for the others, then the group is destroyed.
    A rank that leaves while another is still at work can abort at exit ("terminate called without an
    active exception", SIGABRT: 7 of 60 two-rank torchrun starts where rank 0 left 1 s after rank 1, none
    of 60 with this barrier), and the launcher then kills the one still working; PyTorch's own
    distributed tests end the same way. Only after success: a failed rank exits at once (non-zero) and
    the launcher stops the others (wait=False: destroy without meeting, for a rank on its way out with an
    error)."""
    if par is not None and par.group is not None and dist.is_initialized():
        _leave(wait, timeout_s)


def _leave(wait: bool, timeout_s: float):
    if wait and dist.get_backend() == "gloo":   # names a rank that did not come, not a bare group timeout
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    elif wait:
        dist.barrier()
    dist.destroy_process_group()


def _destroy_at_exit():
    if dist.is_initialized():
        dist.destroy_process_group()


def finish():
    """teardown() of the group setup() joined (the end of `lab unlearn / continual / prepare` under
    torchrun: the CLI calls it after the command succeeded); a no-op when setup() made no group (one
    that a caller initialised is theirs)."""
    global _JOINED
    if _JOINED and dist.is_initialized():
        _leave(True, 600.0)
    _JOINED = False


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the sampling split
def shard_rows(batch: dict, rank: int, world: int) -> dict:
    """Rows rank::world of an encoded batch (nested dicts too): the union over ranks is the batch."""
    if world == 1:
        return batch
    return {k: (shard_rows(v, rank, world) if isinstance(v, dict) else v[rank::world]) for k, v in batch.items()}


def check_split(n_rows: int, world: int, what: str):
    if world > 1 and n_rows < world:
        raise ValueError(f"{what}: {n_rows} rows cannot be split across {world} ranks (every rank needs "
                         f"at least one row of every micro-batch): raise micro_batch_size / batch_size to "
                         f">= {world} or use fewer processes")


# ---------------------------------------------------------------- wrapping
def decoder_layers(model):
    """The decoder layers of a Hugging Face causal LM (Llama-style model.model.layers, GPT-2 style
    transformer.h), the units FSDP2 shards one by one."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"--parallel fsdp: no decoder layers found in {type(model).__name__} "
                     "(looked for model.layers, model.decoder.layers, transformer.h, gpt_neox.layers)")


def wrap(model, par: Parallel | None, *, autocast=None):
    """Prepare `model` in place for `par`: FSDP2 fully_shard per decoder layer and the root (gradient
    sums, bf16 mixed precision on CUDA when autocast is bfloat16); ddp and none leave it as is.
    Idempotent (a model already sharded is returned unchanged)."""
    if par is None or par.mode != "fsdp":
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    if isinstance(model, FSDPModule):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(torch.device(par.device).type, (par.world,))
    kw = {"mesh": mesh}
    if torch.device(par.device).type == "cuda" and autocast == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    # the root too reshards after forward (FSDP2 keeps it gathered by default): a forward-only pass
    # (AutoLR's probes) followed by an in-place edit of the shards must not reuse stale full weights
    fully_shard(model, reshard_after_forward=True, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)   # sums: the engine normalises by the step's global units
            m.set_force_sum_reduction_for_comms(True)   # plain SUM (gloo has no PREMUL_SUM)
    return model


def plain_copy(model, par: Parallel | None):
    """Under fsdp: an unsharded copy of the model (same class and config, the full weights) on every
    rank, for evaluation: its forwards and backwards (GradNorm MIA) issue no collective, so ranks may
    run different numbers of them. A collective (every rank must call it). Other modes: the model."""
    if par is None or par.mode != "fsdp":
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = AutoModelForCausalLM.from_config(model.config, torch_dtype=next(iter(state.values())).dtype)
    copy.load_state_dict(state)
    copy.generation_config = model.generation_config
    return copy.to(par.device).eval()


# ---------------------------------------------------------------- gathers, rank-0 writes, failures
def all_gather_objects(obj, par: Parallel):
    out = [None] * par.world
    dist.all_gather_object(out, obj, group=par.group)
    return out


def barrier(par: Parallel | None):
    if par is not None and par.group is not None:
        dist.barrier(group=par.group)


class RankFailed(RuntimeError):
    pass


def run_all_or_none(fn, par: Parallel | None):
    """fn() on every rank; if any rank raises, every rank raises: the failing rank its own exception,
    the others RankFailed with the failing rank's message (no rank waits forever in a collective the
    failed one never reaches, as long as the ranks meet here). Returns fn()'s value."""
    if par is None or par.group is None:
        return fn()
    err, value = None, None
    try:
        value = fn()
    except Exception as e:   # noqa: BLE001 - re-raised below, on this rank and (as a message) on the others
        err = e
        msg = f"rank {par.rank}: {type(e).__name__}: {e}"
    errors = all_gather_objects(None if err is None else msg, par)
    if err is not None:
        raise err
    failed = [m for m in errors if m]
    if failed:
        raise RankFailed(failed[0])
    return value


def on_writer_whole(model, par: Parallel | None, fn):
    """fn(whole model) on rank 0 alone, the other ranks waiting; under fsdp on an unsharded copy (its
    gather a collective every rank joins, the copy dropped at once on the other ranks). A failure on
    rank 0 stops every rank with its message. The robustness probes run this way under a launcher:
    they fine-tune and quantize copies of the final model, work that splits poorly across ranks."""
    whole = plain_copy(model, par)
    if par is not None and par.group is not None and not par.is_writer:
        del whole
        return run_all_or_none(lambda: None, par)
    return run_all_or_none(lambda: fn(whole), par)


class NullRun:
    """The run of a rank that writes nothing (every rank but 0): the calls of lab.runs' Run, ignored."""
    path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):   # log_step, log_eval, write_summary, ...
        return lambda *a, **k: None


def full_state_dict(model, par: Parallel | None):
    """The full (unsharded) state dict on CPU, for save_pretrained on rank 0 (a collective under fsdp:
    every rank must call it)."""
    if par is None or par.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model, tokenizer, path, par: Parallel | None):
    """Write the model (full weights) and tokenizer to `path` from rank 0; every rank must call it."""
    state = full_state_dict(model, par)
    if par is None or par.is_writer:
        kwargs = {"state_dict": state} if state is not None else {}
        model.save_pretrained(path, **kwargs)
        tokenizer.save_pretrained(path)
    barrier(par)


# ---------------------------------------------------------------- evaluation under a launcher
def evaluate(model, tokenizer, benchmark, par: Parallel | None, *, limit=None, **kwargs) -> dict | None:
    """lab.eval.evaluate under `par`: the same result on rank 0 as one process (None on the other
    ranks). TOFU: each rank scores rows rank::world of every evaluated set (the first `limit` rows),
    the per-row frames are gathered on rank 0 in the single-process order and the metrics computed
    from all of them; other suites run on rank 0 alone. Progress bars on rank 0 only."""
    from lab import eval as lab_eval
    if par is None or par.group is None:
        return lab_eval.evaluate(model, tokenizer, benchmark, limit=limit, **kwargs)
    if not par.is_writer:
        kwargs["progress"] = False
    model = plain_copy(model, par)
    if not benchmark.name.startswith("tofu"):
        out = run_all_or_none(lambda: lab_eval.evaluate(model, tokenizer, benchmark, limit=limit, **kwargs)
                              if par.is_writer else None, par)
        return out
    part = _rank_part(benchmark, limit, par.rank, par.world)
    res = run_all_or_none(lambda: lab_eval.evaluate(model, tokenizer, part, **kwargs), par)
    frames = all_gather_objects(res["rows"], par)
    if not par.is_writer:
        return None
    import pandas as pd
    sets = list(dict.fromkeys(frames[0]["set"]))
    rows = pd.concat(frames, ignore_index=True)
    rows["_set"] = rows["set"].map({s: i for i, s in enumerate(sets)})
    rows = rows.sort_values(["_set", "row"], kind="stable").drop(columns="_set").reset_index(drop=True)
    # the metrics from ALL rows, under the options the evaluation recorded (as lab.eval.restrict_eval)
    recorded = dict(res.get("options") or {})
    opts = lab_eval._eval_options({"mia_k": recorded.pop("mia_k", kwargs.get("mia_k", 0.4))},
                                  **{k: v for k, v in recorded.items() if k != "score_eos"})
    return {**res, "metrics": lab_eval._tofu_metrics(rows, kwargs.get("reference"), opts), "rows": rows}


def _rank_part(benchmark, limit, rank, world):
    """The benchmark with every eval set cut to this rank's rows (rank::world of the first `limit`),
    each keeping its global row index in a `row` column."""
    sets = {}
    for name, ds in benchmark.eval_sets.items():
        n = len(ds) if limit is None else min(limit, len(ds))
        if "row" not in ds.column_names:
            ds = ds.add_column("row", list(range(len(ds))))
        sets[name] = ds.select(range(rank, n, world))
    return dataclasses.replace(benchmark, eval_sets=sets)


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


# ---------------------------------------------------------------- continual protocol helpers
def shard_sums(values, par: Parallel | None) -> list[float]:
    """Sums over the shards of per-rank partial counts (fsdp: one all_reduce); other modes hold whole
    tensors on every rank, so the values are already the totals."""
    if par is None or not par.sharded:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=par.device)
    dist.all_reduce(t, group=par.group)
    return t.tolist()


def full_parameters(model, names, par: Parallel | None) -> list:
    """The full values of the parameters `names` (model.named_parameters() names), for a checkpoint that
    rank 0 writes: under fsdp gathered from the shards (on CPU; a collective, every rank must call it;
    None on the other ranks, which full_state_dict's CPU offload leaves empty), otherwise the parameters
    themselves (whole on every rank)."""
    state = full_state_dict(model, par)
    if state is None:
        params = dict(model.named_parameters())
        return [params[n] for n in names]
    return [state[n] for n in names] if par.is_writer else None


def from_writer(fn, par: Parallel | None):
    """fn() run on rank 0 alone, its value on every rank (one object broadcast); a failure there stops
    every rank (run_all_or_none). One process: fn()."""
    if par is None or par.group is None:
        return fn()
    value = run_all_or_none(lambda: fn() if par.is_writer else None, par)
    out = [value]
    dist.broadcast_object_list(out, src=0, group=par.group)
    return out[0]


# ---------------------------------------------------------------- ALKN's scores and masks on shards
# Under fsdp ALKN's score m, its masks and G_r are local shards (the shapes of the local parameters); the
# quantile of DGS, mu and the realised active fraction need all entries, so they reduce over the group.
def group_sums(values, group, device="cpu") -> list[float]:
    """Sums over `group` of per-rank numbers in one all_reduce (float64: counts exact up to 2**53);
    group None: the values themselves (one process: whole tensors)."""
    if group is None:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def group_extrema(lo: float, hi: float, group, device="cpu") -> tuple[float, float]:
    """(min of lo, max of hi) over `group` in one all_reduce (a rank without entries passes inf, -inf)."""
    if group is None:
        return lo, hi
    t = torch.tensor([-lo, hi], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return -float(t[0]), float(t[1])


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """t summed over `group`, in place (group None: t)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def gather_flat(flat: torch.Tensor, group) -> torch.Tensor:
    """The 1-D tensors of every rank, concatenated in rank order, on every rank. Shards have uneven
    lengths (FSDP2 chunks dim 0), so two all_gathers: the lengths, then the values padded to the longest."""
    if group is None:
        return flat
    world = dist.get_world_size(group)
    n = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    lengths = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lengths, n, group=group)
    lengths = [int(x) for x in lengths]
    padded = torch.zeros(max(lengths), dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:k] for p, k in zip(parts, lengths)])


def full_masks(mask, params, par: Parallel | None):
    """Under fsdp: the whole boolean masks (on CPU) of this rank's shards `mask` of `params` (DTensors),
    on rank 0, None on the others (a collective: every rank must call it; one tensor gathered at a time,
    as uint8: gloo has no bool). Other modes, or mask None: mask itself (already whole)."""
    if mask is None or par is None or not par.sharded:
        return mask
    from torch.distributed.tensor import DTensor
    out = []
    for m, p in zip(mask, params):
        shard = m.to(device=local(p).device, dtype=torch.uint8)
        whole = DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride()).full_tensor()
        out.append(whole.bool().cpu() if par.is_writer else None)
    return out if par.is_writer else None


def local_masks(mask, params, par: Parallel | None):
    """Under fsdp: this rank's shards (on CPU) of whole masks of `params` (DTensors), e.g. masks loaded
    from a run on resume; no collective (every rank holds the whole masks). Other modes, or mask None:
    mask itself."""
    if mask is None or par is None or not par.sharded:
        return mask
    from torch.distributed.tensor import distribute_tensor
    out = []
    for m, p in zip(mask, params):
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"local_masks: a mask of shape {tuple(m.shape)} for a parameter of shape "
                             f"{tuple(p.shape)}; the masks must describe the model's trainable parameters")
        whole = torch.as_tensor(m).to(device=local(p).device, dtype=torch.uint8)
        shard = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)   # no communication
        out.append(shard.to_local().bool().cpu())
    return out
