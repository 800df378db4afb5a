"""The `lab` command line (also `python -m lab`).

    lab prepare --model tiny --benchmark tofu_subset     # target + retain reference models, cached
    lab eval --model tiny --prepared target              # evaluate a prepared model (or any model path)
    lab runs                                             # list run directories under ./runs
    lab runs show RUN                                    # one run: config, summary, evaluations
    lab demo                                             # the embedded default end to end
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _kv(items) -> dict:
    """Parse `key=value` pairs (values as YAML scalars: 3 -> int, 1e-3 -> float, true -> bool)."""
    import yaml
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def cmd_prepare(args) -> None:
    from lab.prepare import prepare
    prepare(model=args.model, benchmark=args.benchmark, benchmark_kwargs=_kv(args.bench_opt),
            seed=args.seed, runs_root=args.runs, force=args.force, **_kv(args.set))


def cmd_eval(args) -> None:
    from lab.data import get_benchmark
    from lab.eval import evaluate
    from lab.models import load_model
    from lab.prepare import prepare
    reference = None
    if args.prepared:
        prepared = prepare(model=args.model, benchmark=args.benchmark, benchmark_kwargs=_kv(args.bench_opt),
                           seed=args.seed, runs_root=args.runs, verbose=False)
        model, tok = prepared.load(args.prepared)
        bench, reference = prepared.benchmark, prepared.retain_eval
    else:
        model, tok = load_model(args.model)
        bench = get_benchmark(args.benchmark, **_kv(args.bench_opt))
    result = evaluate(model, tok, bench, reference=reference, limit=args.limit)
    print(json.dumps(result["metrics"], indent=2, sort_keys=True))
    if args.rows:
        result["rows"].to_csv(args.rows, index=False)
        print(f"per-row outputs: {args.rows}")


def cmd_runs(args) -> None:
    import pandas as pd
    from lab import runs
    if args.action == "list":
        df = runs.list_runs(args.root)
        if df.empty:
            print(f"no runs under {args.root}/")
            return
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(df.drop(columns=["path"]).to_string(index=False))
        return
    if not args.run:
        raise SystemExit("lab runs show: name a run (see `lab runs`)")
    path = args.run if os.path.isdir(args.run) else os.path.join(args.root, args.run)
    if not os.path.isdir(path):
        known = [p.name for p in runs.find_runs(args.root)]
        raise SystemExit(f"no run {args.run!r} under {args.root}/; runs: {', '.join(known) or 'none'}")
    rec = runs.load_run(path)
    print(f"run {rec.run_id}  status={rec.status}")
    for e in rec.errors:
        print(f"  warning: {e}")
    print("config:", json.dumps(rec.config, indent=2, default=str))
    if not rec.trace.empty:
        print(f"trace: {len(rec.trace)} rows, columns: {', '.join(rec.trace.columns)}")
    if not rec.evals.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 40):
            print(rec.evals.set_index([c for c in ("checkpoint", "task", "step") if c in rec.evals]).T
                  .to_string(float_format=lambda x: f"{x:.4g}"))


def cmd_demo(args) -> None:
    from lab.prepare import prepare
    print("lab demo: preparing the tiny target and retain models on the embedded TOFU subset")
    prepare(model="tiny", benchmark="tofu_subset", runs_root=args.runs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, runs=True):
        sp.add_argument("--model", default="tiny", help="preset (tiny, smollm2-135m), local path or hub name")
        sp.add_argument("--benchmark", default="tofu_subset",
                        help="tofu_subset (embedded CPU default), tofu_forget01|05|10, muse_news")
        sp.add_argument("--bench-opt", nargs="*", metavar="K=V",
                        help="benchmark options, e.g. n_retain_authors=8 n_forget_authors=2")
        sp.add_argument("--seed", type=int, default=0)
        if runs:
            sp.add_argument("--runs", default="runs", help="run directory root (default: runs/)")

    sp = sub.add_parser("prepare", help="fine-tune target and retain reference models (cached)")
    common(sp)
    sp.add_argument("--set", nargs="*", metavar="K=V", help="hyper-parameters, e.g. epochs=20 lr=1e-3")
    sp.add_argument("--force", action="store_true", help="ignore the cache and train again")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("eval", help="evaluate a model on a benchmark (TOFU or MUSE-News suite)")
    common(sp)
    sp.add_argument("--prepared", choices=["target", "retain"],
                    help="evaluate the prepared target/retain model of --model/--benchmark "
                         "(gives forget quality and PrivLeak against the retain model)")
    sp.add_argument("--limit", type=int, help="at most this many rows per evaluation set")
    sp.add_argument("--rows", metavar="CSV", help="write per-row outputs to this CSV file")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("runs", help="list run directories, or show one")
    sp.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    sp.add_argument("run", nargs="?", help="run id (folder name) or path, for `show`")
    sp.add_argument("--root", default="runs", help="run directory root (default: runs/)")
    sp.set_defaults(func=cmd_runs)

    sp = sub.add_parser("demo", help="the embedded default end to end (tiny model, TOFU subset)")
    sp.add_argument("--runs", default="runs")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
