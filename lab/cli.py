"""The `lab` command line (also `python -m lab`).

    lab prepare --model tiny --benchmark tofu_subset     # target + retain reference models, cached
    lab eval --model tiny --prepared target              # evaluate a prepared model (or any model path)
    lab unlearn --method npo_gd --epochs 5               # unlearn the prepared target, evaluate, write a run
    lab methods                                          # every method: objectives, combiner, defaults
    lab continual --method alkn --n-tasks 3              # continual unlearning, evaluated after every task
    lab runs                                             # list run directories under ./runs
    lab runs show RUN                                    # one run: config, summary, evaluations
    lab report alkn_continual --profile demo             # execute a notebook into reports/*.ipynb + .html
    lab demo                                             # the embedded default end to end
    lab notebook                                         # JupyterLab on notebooks/ (localhost)
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
            seed=args.seed, runs_root=args.runs, force=args.force, device=args.device,
            parallel=False if args.serial else None, **_kv(args.set))


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
    if not rec.evals.empty and rec.config.get("kind") == "continual":  # per-task table (lab.continual)
        from lab.continual import task_table
        with pd.option_context("display.width", 250, "display.max_columns", 60):
            print(task_table(rec.evals).to_string(float_format=lambda x: f"{x:.4g}"))
    elif not rec.evals.empty:
        with pd.option_context("display.width", 200, "display.max_columns", 40):
            print(rec.evals.set_index([c for c in ("checkpoint", "task", "step") if c in rec.evals]).T
                  .to_string(float_format=lambda x: f"{x:.4g}"))


def _config_from_args(args, config_class, flag_keys) -> dict:
    """--config YAML, then the flags that were given, then --set K=V; unknown keys name the valid ones."""
    import dataclasses
    cfg = {}
    if args.config:
        import yaml
        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{args.config}: expected a mapping of {config_class.__name__} fields")
    cfg.update({key: getattr(args, key) for key in flag_keys if getattr(args, key) is not None})
    cfg["runs_root"] = args.runs
    if args.bench_opt:
        cfg["benchmark_kwargs"] = {**cfg.get("benchmark_kwargs", {}), **_kv(args.bench_opt)}
    if args.arg:
        cfg["method_args"] = {**cfg.get("method_args", {}), **_kv(args.arg)}
    cfg.update(_kv(args.set))
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(cfg) - fields
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(fields)}")
    return cfg


def cmd_unlearn(args) -> None:
    from lab.engine import UnlearnConfig, unlearn
    cfg = _config_from_args(args, UnlearnConfig, (
        "method", "model", "benchmark", "seed", "lr", "epochs", "max_steps", "batch_size",
        "micro_batch_size", "eval_every", "eval_limit", "diagnostics"))
    result = unlearn(cfg)
    print(f"run: {result.run_dir}")
    print(json.dumps(result.metrics, indent=2, sort_keys=True))


def cmd_continual(args) -> None:
    from lab.continual import ContinualConfig, continual
    if args.resume:
        result = continual(resume=args.resume)
    else:
        result = continual(_config_from_args(args, ContinualConfig, (
            "method", "protocol", "model", "benchmark", "seed", "lr", "lr_decay", "epochs", "max_steps",
            "batch_size", "n_tasks", "task_unit", "eval_limit")))
    import pandas as pd
    print(f"run: {result.run_dir}")
    with pd.option_context("display.width", 250, "display.max_columns", 60):
        print(result.table.to_string(float_format=lambda x: f"{x:.4g}"))


def cmd_methods(args) -> None:
    import pandas as pd
    from lab.methods import list_methods
    with pd.option_context("display.width", 250, "display.max_colwidth", 80, "display.max_rows", 200):
        print(list_methods().to_string(index=False))


def _print_report_table(rows) -> None:
    import pandas as pd
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_colwidth", 90):
        print(df[[c for c in ("notebook", "status", "seconds", "report", "error") if c in df]].to_string(index=False))


def cmd_report(args) -> None:
    from lab.report import list_notebooks, run_notebooks
    if bool(args.name) == bool(args.all):
        raise SystemExit(f"lab report: name one notebook or pass --all; notebooks: {', '.join(list_notebooks())}")
    rows = run_notebooks(None if args.all else [args.name], args.profile, out=args.out, params=_kv(args.param),
                         runs_root=args.runs, jobs=args.jobs)
    _print_report_table(rows)
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit(1)


def cmd_claims(args) -> None:
    from lab import claims
    out = claims.write(args.reports, args.out)
    print(f"lab claims: {len(claims.find(args.reports))} claims files -> {out}")


# two demo notebooks side by side: the tiny model uses 2 threads poorly (README: demo timings)
DEMO_JOBS = min(2, len(os.sched_getaffinity(0)))


def cmd_demo(args) -> None:
    """prepare (cached) -> every notebook with the demo profile -> summary -> dashboard."""
    import time
    from lab.prepare import prepare
    from lab.report import REPO, run_notebooks, serve_dashboard
    if args.dashboard_only:
        serve_dashboard(args.runs, args.port)
        return
    t0 = time.time()
    print("lab demo: preparing the tiny target and retain models on the embedded TOFU subset", flush=True)
    prepare(model="tiny", benchmark="tofu_subset", runs_root=args.runs)
    prep_s = time.time() - t0
    print(f"lab demo: prepare took {prep_s:.0f} s; running every notebook with the demo profile", flush=True)
    rows = run_notebooks(None, "demo", out=args.out, runs_root=args.runs, jobs=args.jobs)
    rows.insert(0, {"notebook": "(prepare tiny/tofu_subset)", "status": "ok", "seconds": round(prep_s, 1),
                    "report": "(cached under $LAB_CACHE/prepared)"})
    print()
    _print_report_table(rows)
    print(f"total wall time: {time.time() - t0:.0f} s  (runs in {os.path.abspath(args.runs)}/)", flush=True)
    failed = [r["notebook"] for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"lab demo: notebooks failed: {', '.join(failed)} (see the .failed.ipynb files)")
    if args.no_dashboard:
        return
    app = REPO / "dashboard" / "app.py"
    if not app.is_file():
        print(f"lab demo: no dashboard at {app} - nothing to serve; the reports above are the results")
        return
    serve_dashboard(args.runs, args.port)


def cmd_notebook(args) -> None:
    from lab.report import serve_notebooks
    code = serve_notebooks(args.port, args.token, open_browser=not args.no_browser)
    if code:
        raise SystemExit(code)


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
    sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    sp.add_argument("--serial", action="store_true",
                    help="fine-tune target and retain one after the other (default on CPU: side by side)")
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

    sp = sub.add_parser("continual", help="continual unlearning: a sequence of forget tasks, evaluated after each",
                        description="Unlearn the tasks of --benchmark one after another (--protocol sequential), "
                                    "each from the start (independent) or their growing union (joint) with an "
                                    "engine method (see `lab methods`) or tv / tru / alkn / alkn_wo_esl / "
                                    "alkn_wo_dgs / alkn_wo_apm; every task's forget set and utility are "
                                    "evaluated after each task. Options: --config YAML (ContinualConfig "
                                    "fields), then the flags, then --set K=V. --resume RUN continues an "
                                    "interrupted run from its last finished task.")
    sp.add_argument("--method", help="alkn (default), alkn_wo_esl|dgs|apm, tv, tru, or an engine method (npo_rt, ...)")
    sp.add_argument("--protocol", choices=["sequential", "independent", "joint"])
    sp.add_argument("--model", help="preset (tiny, smollm2-135m), local path or hub name (default tiny)")
    sp.add_argument("--benchmark", help="tofu_subset (default), tofu_forget10 (5 tasks of 4 authors), muse_news")
    sp.add_argument("--bench-opt", nargs="*", metavar="K=V", help="e.g. n_forget_authors=5")
    sp.add_argument("--n-tasks", type=int)
    sp.add_argument("--task-unit", choices=["author", "rows"])
    sp.add_argument("--seed", type=int)
    sp.add_argument("--runs", default="runs")
    sp.add_argument("--config", help="YAML file of ContinualConfig fields")
    sp.add_argument("--lr", type=float)
    sp.add_argument("--lr-decay", type=float, help="lr factor after each task (default 0.5 baselines, 1 ALKN)")
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--max-steps", type=int, help="steps per task")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--eval-limit", type=int, help="rows per eval set and per task")
    sp.add_argument("--arg", nargs="*", metavar="K=V", help="method options, e.g. lam=0.8 mask_alignment=oppose")
    sp.add_argument("--set", nargs="*", metavar="K=V", help="any other ContinualConfig field")
    sp.add_argument("--resume", metavar="RUN", help="run directory of an interrupted continual run")
    sp.set_defaults(func=cmd_continual)

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

    sp = sub.add_parser("report", help="execute notebooks with a parameter profile into HTML reports",
                        description="Execute a notebook (or --all) under papermill with a parameter profile: "
                                    "cpu = the notebook's own defaults, smoke / demo / gpu = "
                                    "notebooks/params/<profile>/<name>.yaml; writes <out>/<name>-<profile>.ipynb "
                                    "and .html (a failing notebook is kept as .failed.ipynb).")
    sp.add_argument("name", nargs="?", help="notebook name, e.g. alkn_continual (see notebooks/)")
    sp.add_argument("--all", action="store_true", help="every notebook in notebooks/")
    sp.add_argument("--profile", default="cpu", help="cpu (default), smoke, demo or gpu")
    sp.add_argument("--out", default="reports", help="report directory (default: reports/)")
    sp.add_argument("--runs", help="runs_root for the notebooks' run directories (default: the profile's)")
    sp.add_argument("-p", "--param", nargs="*", metavar="K=V", help="parameter overrides, e.g. eval_limit=4")
    sp.add_argument("-j", "--jobs", type=int, default=1, help="notebooks at once, each with 1/jobs of the cores")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("claims", help="merge the notebooks' claims files into the claims ledger (docs/claims.md)",
                        description="Collect <dir>/*.claims.json (written by `lab report` beside each report) into "
                                    "one markdown ledger: per paper, each claim's verdict and numbers per executed profile.")
    sp.add_argument("--reports", nargs="+", default=["reports"], help="directories with *.claims.json (default: reports/)")
    sp.add_argument("--out", default="docs/claims.md", help="ledger path (default: docs/claims.md)")
    sp.set_defaults(func=cmd_claims)

    sp = sub.add_parser("notebook", help="JupyterLab on notebooks/ (localhost, this venv's kernel)")
    sp.add_argument("--port", type=int, default=8888, help="port (default 8888)")
    sp.add_argument("--token", help="access token (default: JupyterLab makes one and prints the URL)")
    sp.add_argument("--no-browser", action="store_true", help="do not open a browser")
    sp.set_defaults(func=cmd_notebook)

    sp = sub.add_parser("demo", help="the embedded default end to end: prepare, every notebook (demo profile), "
                                     "HTML reports, then the dashboard")
    sp.add_argument("--runs", default="runs", help="run directory root (default: runs/)")
    sp.add_argument("--out", default="reports", help="report directory (default: reports/)")
    sp.add_argument("--port", type=int, default=8501, help="dashboard port (default 8501)")
    sp.add_argument("--no-dashboard", action="store_true", help="stop after the reports")
    sp.add_argument("--dashboard-only", action="store_true",
                    help="only serve the dashboard over --runs (localhost, no usage statistics)")
    sp.add_argument("-j", "--jobs", type=int, default=DEMO_JOBS,
                    help=f"notebooks at once, each with 1/jobs of the cores (default {DEMO_JOBS})")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: argparse's REMAINDER does not pass on --options
        from lab import bench
        bench.main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
