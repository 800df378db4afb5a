"""The `lab` command line (also `python -m lab`).

    lab prepare --model tiny --benchmark tofu_subset     # target + retain reference models, cached
    lab eval --model tiny --prepared target              # evaluate a prepared model (or any model path)
    lab unlearn --method npo_gd --epochs 5               # unlearn the prepared target, evaluate, write a run
    lab methods                                          # every method: objectives, combiner, defaults
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


def cmd_unlearn(args) -> None:
    from lab.engine import UnlearnConfig, unlearn
    cfg = {}
    if args.config:
        import yaml
        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{args.config}: expected a mapping of UnlearnConfig fields")
    for key in ("method", "model", "benchmark", "seed", "lr", "epochs", "max_steps", "batch_size",
                "micro_batch_size", "eval_every", "eval_limit", "diagnostics"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    cfg["runs_root"] = args.runs
    if args.bench_opt:
        cfg["benchmark_kwargs"] = {**cfg.get("benchmark_kwargs", {}), **_kv(args.bench_opt)}
    if args.arg:
        cfg["method_args"] = {**cfg.get("method_args", {}), **_kv(args.arg)}
    cfg.update(_kv(args.set))
    fields = {f.name for f in __import__("dataclasses").fields(UnlearnConfig)}
    unknown = set(cfg) - fields
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(fields)}")
    result = unlearn(cfg)
    print(f"run: {result.run_dir}")
    print(json.dumps(result.metrics, indent=2, sort_keys=True))


def cmd_methods(args) -> None:
    import pandas as pd
    from lab.methods import list_methods
    with pd.option_context("display.width", 250, "display.max_colwidth", 80, "display.max_rows", 200):
        print(list_methods().to_string(index=False))


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

    sp = sub.add_parser("unlearn", help="unlearn with a named method, evaluate, write a run directory",
                        description="Unlearn the prepared target model of --model/--benchmark with "
                                    "--method (see `lab methods`), evaluating at the end (and every "
                                    "--eval-every steps). Options come from --config YAML (UnlearnConfig "
                                    "fields), then the flags, then --set K=V.")
    sp.add_argument("--method", help="method name, e.g. ga_rt, npo_kl, ngdiff_autolr, gru_npo_gd, blur_npo")
    sp.add_argument("--model", help="preset (tiny, smollm2-135m), local path or hub name (default tiny)")
    sp.add_argument("--benchmark", help="tofu_subset (default), tofu_forget01|05|10, muse_news")
    sp.add_argument("--bench-opt", nargs="*", metavar="K=V")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--runs", default="runs")
    sp.add_argument("--config", help="YAML file of UnlearnConfig fields")
    sp.add_argument("--lr", type=float)
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--max-steps", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--micro-batch-size", type=int, help="gradient accumulation micro-batch")
    sp.add_argument("--eval-every", type=int, help="evaluate every k steps (default: at the end)")
    sp.add_argument("--eval-limit", type=int, help="rows per eval set")
    sp.add_argument("--diagnostics", type=int, help="trace geometry every k steps (0 = off)")
    sp.add_argument("--arg", nargs="*", metavar="K=V", help="method hyper-parameters, e.g. beta=0.1 gamma=0.8")
    sp.add_argument("--set", nargs="*", metavar="K=V", help="any other UnlearnConfig field")
    sp.set_defaults(func=cmd_unlearn)

    sp = sub.add_parser("bench", help="engine benchmark: step time / memory of each method vs the floor",
                        add_help=False)
    sp.add_argument("bench_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=lambda a: __import__("lab.bench").bench.main(a.bench_args))

    sp = sub.add_parser("methods", help="list unlearning methods (objectives, combiner, defaults)")
    sp.set_defaults(func=cmd_methods)

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
