"""Engine benchmark: step time and peak memory of each gradient-geometry method against the floor.

    lab bench --model tiny --rounds 20          # or: python -m lab.bench --model smollm2-135m

All variants run in ONE process on the same model and the same batches, interleaved round-robin so
machine noise hits them alike; times are medians over rounds, reported as ratios to the floor step:
fwd+bwd on the forget batch, fwd+bwd on the retain batch, optimizer step, nothing else; each "+diag"
variant (trace geometry every step) also as a ratio to the same method untraced. Peak memory
(bytes allocated during one step above what was live before it) is reported as the delta to the floor
in units of the model's parameter size. Writes a table and a JSON file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lab import engine, runs
from lab.engine import LoopState, UnlearnConfig
from lab.methods import get_method

VARIANTS = [  # (label, method, diagnostics every k; 0 = off)
    ("graddiff", "ga_rt", 0), ("graddiff+diag", "ga_rt", 1),
    ("gru", "gru_gd", 0), ("gru+diag", "gru_gd", 1),
    ("blur", "blur_ga", 0), ("blur+diag", "blur_ga", 1),
    ("ngdiff", "ngdiff", 0), ("ngdiff+diag", "ngdiff", 1),
    ("ngdiff+autolr", "ngdiff_autolr", 0), ("ngdiff+autolr+diag", "ngdiff_autolr", 1),
]


def _batches(model_name, batch_size, max_length, device, seed=0):
    from lab.data import tofu_subset
    from lab.models import load_model
    model, tok = load_model(model_name, device=device, seed=seed)
    bench = tofu_subset()
    rows = list(range(batch_size))
    micro = [{"forget": engine.encode_rows(tok, bench.forget, rows, max_length=max_length),
              "retain": engine.encode_rows(tok, bench.retain, rows, max_length=max_length)}]
    return model, [engine._to(m, device) for m in micro]


def _floor_step(model, params, optimizer, micro, ctx, args):
    method, _ = get_method("ga_rt")
    for p in params:
        p.grad = None
    for mb in micro:
        for term in (*method.forget, *method.retain):
            from lab.objectives import get_objective
            obj = get_objective(term.objective)
            (obj.fn(model, mb[term.source], ctx) / obj.count(mb[term.source])).backward()
    optimizer.step()
    return {}


def _variant_runner(label, method_name, diag, model, params, optimizer, micro, cfg):
    if label == "floor":
        method, args = get_method("ga_rt")
        ctx = engine.make_context(model, method, args, None, None, cfg, None)
        return lambda: _floor_step(model, params, optimizer, micro, ctx, args)
    method, args = get_method(method_name)
    vcfg = UnlearnConfig(**{**cfg.__dict__, "method": method_name, "diagnostics": diag})
    ctx = engine.make_context(model, method, args, None, None, vcfg, None)
    state = LoopState()
    gen = torch.Generator().manual_seed(0)

    def step():
        row = engine._step(model, params, optimizer, method, args, ctx, micro, state, vcfg, vcfg.lr,
                           rlw_gen=gen, group=None, autolr_due=method.autolr and state.step % 10 == 0)
        state.step += 1
        return row
    return step


def run_bench(model_name="tiny", rounds=20, warmup=3, batch_size=8, max_length=256, device="cpu",
              memory=True, variants=VARIANTS, progress=True) -> dict:
    torch.manual_seed(0)
    model, micro = _batches(model_name, batch_size, max_length, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    cfg = UnlearnConfig(method="ga_rt", model=model_name, lr=1e-7, batch_size=batch_size)
    # lr tiny: the steps must not change the model's numerics (no divergence mid-benchmark)
    all_variants = [("floor", None, 0), *variants]
    # one AdamW shared by all variants: the step costs the same whatever its state holds, and 11 copies
    # of Adam's moments would not fit beside a 135M model on a 24 GiB machine
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    runners = {label: _variant_runner(label, m, k, model, params, optimizer, micro, cfg)
               for label, m, k in all_variants}
    times = {label: [] for label in runners}
    for r in range(warmup + rounds):
        for label, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            if r >= warmup:
                times[label].append(time.perf_counter() - t0)
        if progress:
            print(f"\rround {r + 1}/{warmup + rounds}", end="", flush=True)
    if progress:
        print()
    floor = statistics.median(times["floor"])
    result = {"model": model_name, "device": device, "rounds": rounds, "batch_size": batch_size,
              "max_length": max_length, "param_bytes": param_bytes, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "floor_seconds": floor, "variants": {}}
    peaks = _peak_memory(runners, device) if memory else {}
    for label, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
        entry = {"median_seconds": med, "ratio_to_floor": med / floor, "iqr_ratio": (q[2] - q[0]) / floor}
        if peaks:
            entry["peak_bytes"] = peaks[label]
            entry["peak_delta_params"] = (peaks[label] - peaks["floor"]) / param_bytes
        result["variants"][label] = entry
    for label, entry in result["variants"].items():  # what tracing costs: X+diag over X
        base = result["variants"].get(label.removesuffix("+diag"))
        if label.endswith("+diag") and base is not None:
            entry["ratio_to_untraced"] = entry["median_seconds"] / base["median_seconds"]
    return result


def _peak_memory(runners, device) -> dict:
    """Peak bytes allocated during one step above what was live before it (activations, gradients, the
    method's extra gradient lists). CUDA: the allocator's peak counter. CPU: the profiler's allocation
    events, summed in time order (torch's MemTracker refuses modules called twice per step)."""
    peaks = {}
    for label, fn in runners.items():
        if device != "cpu":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[label] = torch.cuda.max_memory_allocated() - base
            continue
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        peaks[label] = peak
    return peaks


def format_table(result: dict) -> str:
    import pandas as pd
    df = pd.DataFrame(result["variants"]).T
    cols = [c for c in ("ratio_to_floor", "ratio_to_untraced", "iqr_ratio", "median_seconds", "peak_delta_params")
            if c in df]
    head = (f"model={result['model']} device={result['device']} params={result['param_bytes'] / 2**20:.1f} MiB "
            f"batch={result['batch_size']}x{result['max_length']} rounds={result['rounds']} "
            f"floor={result['floor_seconds'] * 1000:.1f} ms")
    return head + "\n" + df[cols].astype(float).to_string(float_format=lambda x: f"{x:.3f}")


# ---------------------------------------------------------------- under FSDP2 / DDP (lab.distributed)
PARALLEL_VARIANTS = [v for v in VARIANTS if v[0] == "graddiff" or v[2]]   # the untraced floor-like one + traced


class _CollectiveClock:
    """Counts and times the scalar collectives the engine and geometry issue (dist.all_reduce,
    dist.broadcast); FSDP2's own all-gathers / reduce-scatters (the floor has them too) are not these."""

    def __init__(self):
        import torch.distributed as dist
        self.calls, self.seconds, self._orig = 0, 0.0, {}
        for name in ("all_reduce", "broadcast"):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, self._timed(self._orig[name]))

    def _timed(self, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.calls += 1
            self.seconds += time.perf_counter() - t0
            return out
        return call

    def reset(self):
        self.calls, self.seconds = 0, 0.0


def _parallel_worker(rank, world, port, mode, model_name, rounds, warmup, batch_size, max_length, variants, out):
    import os
    import torch.distributed as dist
    from lab import distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    par = distributed.setup(mode, "cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, micro = _batches(model_name, batch_size, max_length, par.device)
    micro = [distributed.shard_rows(m, rank, world) for m in micro]
    distributed.wrap(model, par)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    local = distributed.local_list(params)
    cfg = UnlearnConfig(method="ga_rt", model=model_name, lr=1e-7, batch_size=batch_size)
    optimizer = torch.optim.AdamW(local, lr=cfg.lr)
    ga_rt, ga_args = get_method("ga_rt")
    floor_ctx = engine.make_context(model, ga_rt, ga_args, None, None, cfg, None)

    def floor():   # fwd+bwd forget, fwd+bwd retain (FSDP's reduce-scatters included), optimizer step
        units = engine.step_units((*ga_rt.forget, *ga_rt.retain), micro, local[0].device, par.group)
        grads, _ = engine.accumulate(model, params, (*ga_rt.forget, *ga_rt.retain), micro, floor_ctx, ga_args,
                                     group=par.group, sharded=par.sharded, units=units, reduce_losses=False)
        for p, g in zip(local, grads):
            p.grad = g
        optimizer.step()
        for p in local:
            p.grad = None

    runners = {"floor": floor}
    for label, name, diag in variants:
        method, args = get_method(name)
        vcfg = UnlearnConfig(**{**cfg.__dict__, "method": name, "diagnostics": diag})
        ctx = engine.make_context(model, method, args, None, None, vcfg, None)
        state, gen = LoopState(), torch.Generator().manual_seed(0)

        def step(method=method, args=args, vcfg=vcfg, ctx=ctx, state=state, gen=gen):
            engine._step(model, params, optimizer, method, args, ctx, micro, state, vcfg, vcfg.lr, rlw_gen=gen,
                         group=par.group, sharded=par.sharded,
                         autolr_due=method.autolr and state.step % 10 == 0)
            state.step += 1
        runners[label] = step
    clock = _CollectiveClock()
    times = {k: [] for k in runners}
    calls = {k: [] for k in runners}
    share = {k: [] for k in runners}
    for r in range(warmup + rounds):
        for label, fn in runners.items():
            dist.barrier()
            clock.reset()
            t0 = time.perf_counter()
            fn()
            if par.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[label].append(dt)
                calls[label].append(clock.calls)
                share[label].append(clock.seconds / dt)
    if rank == 0:
        floor_t = statistics.median(times["floor"])
        result = {"model": model_name, "device": par.device, "parallel": mode, "nproc": world, "rounds": rounds,
                  "batch_size": batch_size, "max_length": max_length, "torch": torch.__version__,
                  "floor_seconds": floor_t, "variants": {
                      k: {"median_seconds": statistics.median(v), "ratio_to_floor": statistics.median(v) / floor_t,
                          "collectives_per_step": statistics.median(calls[k]),
                          "collective_share": statistics.median(share[k])} for k, v in times.items()}}
        runs.atomic_write_json(Path(out), result)
    distributed.teardown(par)


def run_parallel_bench(model_name="tiny", nproc=2, mode="fsdp", rounds=10, warmup=2, batch_size=8,
                       max_length=256, variants=PARALLEL_VARIANTS, out="bench/results") -> dict:
    """Step time of each method over the floor with `nproc` processes (gloo on CPU) under FSDP2 (or ddp),
    the scalar collectives per step and the share of the step spent in them."""
    import tempfile
    import torch.multiprocessing as mp
    from lab.distributed import _free_port
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.json")
        mp.spawn(_parallel_worker, args=(nproc, _free_port(), mode, model_name, rounds, warmup, batch_size,
                                         max_length, list(variants), path), nprocs=nproc, join=True)
        return json.loads(Path(path).read_text())


def format_parallel_markdown(result: dict) -> str:
    head = (f"`{result['model']}` under `{result['parallel']}` x{result['nproc']} ({result['device']}), batch "
            f"{result['batch_size']}x{result['max_length']}, {result['rounds']} rounds, floor "
            f"{result['floor_seconds'] * 1000:.0f} ms/step\n\n"
            "| variant | time / floor | median ms | scalar collectives / step | share of step in them |\n"
            "|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {k} | {v['ratio_to_floor']:.3f} | {v['median_seconds'] * 1000:.0f} | {v['collectives_per_step']:.0f} | "
        f"{v['collective_share'] * 100:.1f} % |" for k, v in result["variants"].items())


def format_markdown(result: dict) -> str:
    """The README table of a result (python -m lab.bench --markdown bench/results/tiny-cpu.json)."""
    head = (f"`{result['model']}` ({result['param_bytes'] / 2**20:.0f} MiB fp32), batch "
            f"{result['batch_size']}x{result['max_length']}, {result['rounds']} rounds, floor "
            f"{result['floor_seconds'] * 1000:.0f} ms/step\n\n"
            "| variant | time / floor | traced / untraced | IQR / floor | median ms | peak mem delta (param sizes) |\n"
            "|---|---|---|---|---|---|\n")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    return head + "\n".join(
        f"| {label} | {v['ratio_to_floor']:.3f} | {fmt(v.get('ratio_to_untraced'), '.3f')} | {v['iqr_ratio']:.3f} | "
        f"{v['median_seconds'] * 1000:.0f} | {fmt(v.get('peak_delta_params'), '+.2f')} |"
        for label, v in result["variants"].items())


def main(argv=None):
    p = argparse.ArgumentParser(prog="lab bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="bench/results", help="folder for <model>-<device>.json")
    p.add_argument("--markdown", metavar="JSON", help="print the README table of a saved result and exit")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default="none",
                   help="fsdp / ddp: the methods under lab.distributed with --nproc processes (gloo on CPU)")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    if args.markdown:
        result = json.loads(Path(args.markdown).read_text())
        print(format_parallel_markdown(result) if "parallel" in result else format_markdown(result))
        return
    if args.parallel != "none":
        result = run_parallel_bench(args.model, args.nproc, args.parallel, rounds=args.rounds,
                                    batch_size=args.batch_size, max_length=args.max_length)
        print(format_parallel_markdown(result))
        path = Path(args.out) / f"{args.model}-{args.parallel}{args.nproc}-{result['device'].split(':')[0]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_json(path, result)
        print(f"wrote {path}")
        return
    result = run_bench(args.model, rounds=args.rounds, batch_size=args.batch_size,
                       max_length=args.max_length, device=args.device, memory=not args.no_memory)
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}-{args.device}.json"
    runs.atomic_write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
