"""The `lab` command line (also `python -m lab`).

    lab prepare --model tiny --benchmark tofu_subset     # target + retain reference models, cached
    lab eval --model tiny --prepared target              # evaluate a prepared model (or any model path)
    lab unlearn --method npo_gd --epochs 5               # unlearn the prepared target, evaluate, write a run
    lab methods                                          # every method: objectives, combiner, defaults
    lab continual --method alkn --n-tasks 3              # continual unlearning, evaluated after every task
    lab unlearn --method ga --probes relearn,quant4      # + robustness probes on the final model
    lab probe RUN --probes relearn                       # probes on a run saved with --save-model
    lab runs                                             # list run directories under ./runs
    lab runs show RUN                                    # one run: config, summary, evaluations
    lab report alkn_continual --profile demo             # execute a notebook into reports/*.ipynb + .html
    lab demo                                             # the embedded default end to end
    lab notebook                                         # JupyterLab on notebooks/ (localhost)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _kv(items) -> dict:
    """Parse `key=value` pairs (values as YAML scalars: 3 -> int, 1e-3 -> float, true -> bool)."""
    import yaml
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        value = yaml.safe_load(v)
        if isinstance(value, str):   # PyYAML (YAML 1.1) reads 1e-4 as a string; a float is meant
            with contextlib.suppress(ValueError):
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        out[k] = value
    return out


def _int_at_least(lo: int):
    """argparse type: an int >= lo, else the valid range (checked before any work starts)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int; valid: an int >= {lo}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is out of range; valid: an int >= {lo}")
        return value
    parse.__name__ = f"int >= {lo}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: a number > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is out of range; valid: a number > 0")
    return value


def _check_ranges(cfg: dict) -> None:
    """The ranges of values from --config / --set (the flags check theirs in argparse): UnlearnConfig's table
    (lab.engine.INT_FIELDS) plus continual's n_tasks."""
    from lab.engine import INT_FIELDS
    for key, (lo, optional) in {**INT_FIELDS, "n_tasks": (1, True)}.items():
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
            raise ValueError(f"{key}={value!r}; valid: an int >= {lo}" + (" or null" if optional else ""))
    if cfg.get("lr") is not None and not (isinstance(cfg["lr"], (int, float)) and cfg["lr"] > 0):
        raise ValueError(f"lr={cfg['lr']!r}; valid: a number > 0 or null (the model's default)")


def _check_model(name) -> None:
    """Fail here, in seconds, for a model name that cannot load - before prepare starts its workers."""
    from lab.models import check_model
    check_model(name or "tiny")


def _run_path(run: str, root: str, what="run") -> str:
    """A run given by path or by id (folder name under root)."""
    from lab import runs
    path = run if os.path.isdir(run) else os.path.join(root, run)
    if not os.path.isdir(path):
        known = [p.name for p in runs.find_runs(root)]
        raise FileNotFoundError(f"no {what} {run!r} (neither a folder nor a run id under {root}/); "
                                f"runs there: {', '.join(known[-10:]) or 'none'}")
    return path


def cmd_prepare(args) -> None:
    from lab.prepare import prepare
    _check_model(args.model)
    launched = args.parallel in ("ddp", "fsdp")
    if args.serial and launched:
        raise ValueError(f"--serial with --parallel {args.parallel}: under a launcher the ranks fine-tune target "
                         "and retain one after the other already; drop --serial")
    prepare(model=args.model, benchmark=args.benchmark, benchmark_kwargs=_kv(args.bench_opt),
            seed=args.seed, runs_root=args.runs, force=args.force, device=args.device,
            parallel=args.parallel if launched else (False if args.serial else None), **_kv(args.set))


def cmd_eval(args) -> None:
    from lab.data import get_benchmark
    from lab.eval import evaluate
    from lab.models import load_model
    from lab.prepare import prepare
    reference = None
    if args.prepared:
        _check_model(args.model)
        prepared = prepare(model=args.model, benchmark=args.benchmark, benchmark_kwargs=_kv(args.bench_opt),
                           seed=args.seed, runs_root=args.runs, verbose=False, score_eos=args.score_eos)
        model, tok = prepared.load(args.prepared)
        bench, reference = prepared.benchmark, prepared.retain_eval
    else:
        bench = get_benchmark(args.benchmark, **_kv(args.bench_opt))
        _check_model(args.model)
        model, tok = load_model(args.model)
    result = evaluate(model, tok, bench, reference=reference, limit=args.limit, score_eos=args.score_eos)
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
    if args.action == "robustness":
        print(robustness_markdown(args.root))
        return
    if not args.run:
        raise ValueError("name a run: lab runs show RUN (see `lab runs`)")
    rec = runs.load_run(_run_path(args.run, args.root))
    note = rec.status_note if rec.status != "broken" else ""     # a broken run's errors follow as warnings
    print(f"run {rec.run_id}  status={rec.status}" + (f"  ({note})" if note else ""))
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


def robustness_markdown(root) -> str:
    """A markdown table of every probe record under root (lab.runs_views.robustness_table): per run and
    probe, model utility and forget ROUGE-L / Prob unlearned -> probed, target and retain floor, recovery."""
    import pandas as pd
    from lab import runs, runs_views
    records = [runs.load_run(p) for p in runs.find_runs(root)]
    table = runs_views.robustness_table(records)
    if table.empty:
        raise ValueError(f"no robustness probe records under {root}/ (run with --probes, or lab probe RUN)")

    def num(v, fmt=".3f"):
        return "" if v is None or pd.isna(v) else format(v, fmt)
    lines = ["| run | method | probe | rows | MU unlearned -> probed | forget ROUGE-L unlearned -> probed "
             "(target, retain floor) | recovery ROUGE-L | forget Prob unlearned -> probed | recovery Prob |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        floor = f"; retain model: {num(r['floor_recovery_rouge'])}" if pd.notna(r["floor_recovery_rouge"]) else ""
        lines.append(
            f"| {r['run_id']} | {r['label']} | {r['probe']} | {num(r['probe_rows'], '.0f')} "
            f"| {num(r['model_utility'])} -> {num(r['probe_model_utility'])} "
            f"| {num(r['unlearned_forget_rouge'])} -> {num(r['forget_rouge'])} ({num(r['target_forget_rouge'])}, "
            f"{num(r['floor_forget_rouge'])}) | {num(r['recovery_rouge'])}{floor} "
            f"| {num(r['unlearned_forget_prob'], '.4f')} -> {num(r['forget_prob'], '.4f')} | {num(r['recovery_prob'])} |")
    return "\n".join(lines)


def _config_from_args(args, config_class, flag_keys) -> dict:
    """--config YAML, then the flags that were given, then --set K=V; unknown keys name the valid ones."""
    import dataclasses
    cfg = {}
    if args.config:
        import yaml
        try:
            with open(args.config) as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {args.config}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{args.config}: expected a mapping of {config_class.__name__} fields")
    cfg.update({key: getattr(args, key) for key in flag_keys if getattr(args, key) is not None})
    cfg["runs_root"] = args.runs
    if args.bench_opt:
        cfg["benchmark_kwargs"] = {**cfg.get("benchmark_kwargs", {}), **_kv(args.bench_opt)}
    if args.arg:
        cfg["method_args"] = {**cfg.get("method_args", {}), **_kv(args.arg)}
    if getattr(args, "probe_opt", None):
        cfg["probe_options"] = {**cfg.get("probe_options", {}), **_kv(args.probe_opt)}
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
        "micro_batch_size", "eval_every", "eval_limit", "diagnostics", "probes", "save_model", "parallel", "nproc",
        "lora"))
    _check_ranges(cfg)
    _check_model(cfg.get("model"))
    from lab import runs
    with runs.experiment(args.tag):   # config.yaml `experiment` (the dashboard's experiment picker)
        result = unlearn(cfg)
    if result.run_dir is None:   # a rank other than 0 under a launcher: rank 0 reports
        return
    print(f"run: {result.run_dir}")
    print(json.dumps(result.metrics, indent=2, sort_keys=True))


def cmd_continual(args) -> None:
    if args.resume:
        changing = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                    if k not in RESUME_KEEPS and v not in (None, False, [])]
        if changing:
            raise ValueError(f"--resume continues the run with its own config.yaml; drop {', '.join(changing)} "
                             "(they would change the run)")
        path = _run_path(args.resume, args.runs, "continual run")
        from lab.continual import continual
        how = {"parallel": args.parallel} if args.parallel else {}   # how it runs (a launcher), not what
        result = continual(resume=path, **how)
    else:
        from lab.continual import ContinualConfig, continual
        cfg = _config_from_args(args, ContinualConfig, (
            "method", "protocol", "model", "benchmark", "seed", "lr", "lr_decay", "epochs", "max_steps",
            "batch_size", "n_tasks", "task_unit", "eval_limit", "probes", "save_model", "parallel", "nproc", "lora"))
        _check_ranges(cfg)
        _check_model(cfg.get("model"))
        from lab import runs
        with runs.experiment(args.tag):
            result = continual(cfg)
    if result.run_dir is None:   # a rank other than 0 under a launcher: rank 0 reports
        return
    import pandas as pd
    print(f"run: {result.run_dir}")
    with pd.option_context("display.width", 250, "display.max_columns", 60):
        print(result.table.to_string(float_format=lambda x: f"{x:.4g}"))


def cmd_probe(args) -> None:
    import pandas as pd
    from lab import probes, runs
    path = _run_path(args.run, args.root)
    out = probes.probe_run(path, args.probes, _kv(args.probe_opt), device=args.device)
    from lab.runs_views import robustness_table
    table = robustness_table([runs.load_run(path)])
    table = table[table["probe"].isin(list(out))]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.drop(columns=["run_id", "kind", "protocol"]).to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def _probe_list(text: str) -> list:
    return [p.strip() for p in text.split(",") if p.strip()]


PROBES_HELP = ("robustness probes on the final model, comma-separated: relearn,quant8,quant4,paraphrase,fewshot "
               "(METHODS §8; one eval record each, checkpoint probe:<name>)")
PROBE_OPT_HELP = ("probe options, e.g. relearn_steps=20 relearn_fraction=0.2 relearn_data=paraphrased "
                  "relearn_lr=1e-3 quant_group_size=64 fewshot_k=5 (lab.probes.DEFAULTS)")


RESUME_KEEPS = {"resume", "runs", "func", "command", "data", "debug", "parallel"}   # continual flags that --resume accepts


def cmd_plan(args) -> None:
    from lab.plan import format_plan, plan, to_json
    p = plan(args.model, args.method, parallel=args.parallel, gpus=args.gpus, lora=args.lora,
             batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
             dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, gpu_memory=args.gpu_memory,
             diagnostics=args.diagnostics)
    print(to_json(p) if args.json else format_plan(p))


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
    if args.reuse_runs:   # the kernels inherit it: lab.experiments.run_grid reuses finished runs under runs_root
        from lab.runs import REUSE_ENV
        os.environ[REUSE_ENV] = "1"
    rows = run_notebooks(None if args.all else [args.name], args.profile, out=args.out, params=_kv(args.param),
                         runs_root=args.runs, jobs=args.jobs)
    _print_report_table(rows)
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit(1)


def cmd_claims(args) -> None:
    from lab import claims
    out = claims.write(args.reports, args.out)
    print(f"lab claims: {len(claims.find(args.reports))} claims files -> {out}")
    if args.figures:
        for png in claims.export_figures(claims.find(args.reports), args.figures, profiles=args.figure_profiles):
            print(f"lab claims: headline figure -> {png}")


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


def _defaults_help(show: bool) -> dict:
    """' (default: ...)' help suffixes read from the config classes, keyed 'unlearn.<field>' /
    'continual.<field>' and 'lr'. Only built for --help: importing lab.engine loads torch."""
    import collections
    out = collections.defaultdict(str)
    if not show:
        return out
    import dataclasses
    from lab.continual import ContinualConfig
    from lab.engine import DEFAULT_LR
    from lab.engine import UnlearnConfig
    lrs = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items() if k)
    out["lr"] = f" (default: per model: {lrs}, other models {DEFAULT_LR[None]:g})"
    for prefix, cls in (("unlearn", UnlearnConfig), ("continual", ContinualConfig)):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f"{prefix}.{f.name}"] = f" (default: {f.default})"
    return out


TAG_HELP = "experiment tag recorded in config.yaml (`experiment`); the dashboard picks runs by it"


def cmd_notebook(args) -> None:
    from lab.report import serve_notebooks
    code = serve_notebooks(args.port, args.token, open_browser=not args.no_browser)
    if code:
        raise SystemExit(code)


def build_parser(show_defaults: bool = False) -> argparse.ArgumentParser:
    """The argument parser; show_defaults puts the config classes' defaults into the help texts."""
    D = _defaults_help(show_defaults)
    p = argparse.ArgumentParser(prog="lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback (accepted anywhere on the command line)")
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
    sp.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                    help="under torchrun / accelerate launch: ddp (replicated weights) or fsdp (FSDP2 shards); "
                         "the ranks fine-tune retain, then target, together; rank 0 writes the cache entry. "
                         "Default none = one process (README 'Scaling out')")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("eval", help="evaluate a model on a benchmark (TOFU or MUSE-News suite)")
    common(sp)
    sp.add_argument("--prepared", choices=["target", "retain"],
                    help="evaluate the prepared target/retain model of --model/--benchmark "
                         "(gives forget quality and PrivLeak against the retain model)")
    sp.add_argument("--limit", type=_int_at_least(1), help="at most this many rows per evaluation set")
    sp.add_argument("--no-score-eos", dest="score_eos", action="store_false",
                    help="score answers without their EOS token (default: with, as TOFU / open-unlearning)")
    sp.add_argument("--rows", metavar="CSV", help="write per-row outputs to this CSV file")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("unlearn", help="unlearn with a named method, evaluate, write a run directory",
                        description="Unlearn the prepared target model of --model/--benchmark with "
                                    "--method (see `lab methods`), evaluating at the end (and every "
                                    "--eval-every steps). Options come from --config YAML (UnlearnConfig "
                                    "fields), then the flags, then --set K=V.")
    sp.add_argument("--method", help="method name, e.g. ga_rt, npo_kl, ngdiff_autolr, gru_npo_gd, blur_npo"
                                     + D["unlearn.method"])
    sp.add_argument("--model", help="preset (tiny, smollm2-135m), local path or hub name (default tiny)")
    sp.add_argument("--benchmark", help="tofu_subset (default), tofu_forget01|05|10, muse_news")
    sp.add_argument("--bench-opt", nargs="*", metavar="K=V")
    sp.add_argument("--seed", type=int, help="random seed" + D["unlearn.seed"])
    sp.add_argument("--runs", default="runs")
    sp.add_argument("--config", help="YAML file of UnlearnConfig fields")
    sp.add_argument("--lr", type=_positive_float, help="learning rate" + D["lr"])
    sp.add_argument("--epochs", type=_int_at_least(1), help="passes over the forget set" + D["unlearn.epochs"])
    sp.add_argument("--max-steps", type=_int_at_least(1), help="stop after this many steps (default: epochs)")
    sp.add_argument("--batch-size", type=_int_at_least(1), help="forget rows per step" + D["unlearn.batch_size"])
    sp.add_argument("--micro-batch-size", type=_int_at_least(1),
                    help="gradient accumulation micro-batch, divides --batch-size (default: the batch)")
    sp.add_argument("--eval-every", type=_int_at_least(0), help="evaluate every k steps (default or 0: at the end)")
    sp.add_argument("--eval-limit", type=_int_at_least(1), help="rows per eval set (default: all)")
    sp.add_argument("--diagnostics", type=_int_at_least(0),
                    help="trace geometry every k steps, 0 = off" + D["unlearn.diagnostics"])
    sp.add_argument("--arg", nargs="*", metavar="K=V", help="method hyper-parameters, e.g. beta=0.1 gamma=0.8")
    sp.add_argument("--probes", type=_probe_list, help=PROBES_HELP)
    sp.add_argument("--probe-opt", nargs="*", metavar="K=V", help=PROBE_OPT_HELP)
    sp.add_argument("--save-model", action="store_true", default=None,
                    help="write the final weights to <run>/model (for `lab probe RUN` later)")
    sp.add_argument("--set", nargs="*", metavar="K=V", help="any other UnlearnConfig field")
    sp.add_argument("--tag", help=TAG_HELP)
    sp.add_argument("--parallel", choices=["none", "ddp", "fsdp"],
                    help="under torchrun / accelerate launch: ddp (replicated weights) or fsdp (FSDP2 shards); "
                         "default none = one process (README 'Scaling out')")
    sp.add_argument("--nproc", type=int, metavar="N",
                    help="with --parallel ddp|fsdp and no launcher: start N ranks on this machine (torchrun) yourself")
    sp.add_argument("--lora", metavar="SPEC",
                    help="train peft LoRA adapters only, e.g. r=16,alpha=32,dropout=0,targets=q_proj,k_proj,v_proj,o_proj "
                         "(evaluation and --save-model on the merged model; the adapter in <run>/adapter)")
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
    sp.add_argument("--n-tasks", type=_int_at_least(1))
    sp.add_argument("--task-unit", choices=["author", "rows"])
    sp.add_argument("--seed", type=int, help="random seed" + D["unlearn.seed"])
    sp.add_argument("--runs", default="runs")
    sp.add_argument("--config", help="YAML file of ContinualConfig fields")
    sp.add_argument("--lr", type=_positive_float, help="learning rate of the first task" + D["lr"])
    sp.add_argument("--lr-decay", type=float, help="lr factor after each task (default 0.5 baselines, 1 ALKN)")
    sp.add_argument("--epochs", type=_int_at_least(1), help="passes over each task" + D["continual.epochs"])
    sp.add_argument("--max-steps", type=_int_at_least(1), help="steps per task (default: epochs)")
    sp.add_argument("--batch-size", type=_int_at_least(1), help="forget rows per step" + D["continual.batch_size"])
    sp.add_argument("--eval-limit", type=_int_at_least(1), help="rows per eval set and per task (default: all)")
    sp.add_argument("--arg", nargs="*", metavar="K=V", help="method options, e.g. lam=0.8 mask_alignment=oppose")
    sp.add_argument("--probes", type=_probe_list, help=PROBES_HELP + "; after the last task")
    sp.add_argument("--probe-opt", nargs="*", metavar="K=V", help=PROBE_OPT_HELP)
    sp.add_argument("--save-model", action="store_true", default=None,
                    help="write the final weights to <run>/model (for `lab probe RUN` later)")
    sp.add_argument("--set", nargs="*", metavar="K=V", help="any other ContinualConfig field")
    sp.add_argument("--tag", help=TAG_HELP)
    sp.add_argument("--resume", metavar="RUN", help="an interrupted continual run (its folder, or its id under "
                                                    "--runs); no flags that would change it")
    sp.add_argument("--parallel", choices=["none", "ddp", "fsdp"],
                    help="under torchrun / accelerate launch: ddp (replicated weights) or fsdp (FSDP2 shards); "
                         "default none = one process (README 'Scaling out')")
    sp.add_argument("--nproc", type=int, metavar="N",
                    help="with --parallel ddp|fsdp and no launcher: start N ranks on this machine (torchrun) yourself")
    sp.add_argument("--lora", metavar="SPEC",
                    help="train one peft LoRA adapter across the tasks, e.g. r=16,alpha=32,targets=q_proj,v_proj "
                         "(engine methods only, not alkn / tv / tru; evaluation on the merged model)")
    sp.set_defaults(func=cmd_continual)

    sp = sub.add_parser("plan", help="predicted memory per device of a run (weights, gradient lists, optimizer "
                                     "state, activations) and whether it fits")
    sp.add_argument("--model", required=True, help="tiny, smollm2-135m, llama-2-7b, phi-1.5, ... or a hub name")
    sp.add_argument("--method", required=True)
    sp.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    sp.add_argument("--gpus", type=int, default=1)
    sp.add_argument("--lora", help="r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--micro-batch-size", type=int)
    sp.add_argument("--max-length", type=int, default=512)
    sp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    sp.add_argument("--gradient-checkpointing", action="store_true")
    sp.add_argument("--diagnostics", action="store_true", help="diagnostic steps (g_r and the pre-step buffer)")
    sp.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per device")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("bench", help="engine benchmark: step time / memory of each method vs the floor",
                        add_help=False)
    sp.add_argument("bench_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=lambda a: __import__("lab.bench").bench.main(a.bench_args))

    sp = sub.add_parser("bench-eval", help="evaluation benchmark: the TOFU suite vs an open-unlearning-style "
                                           "baseline, same model and rows (lab/bench_eval.py)", add_help=False)
    sp.add_argument("bench_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=lambda a: __import__("lab.bench_eval").bench_eval.main(a.bench_args))

    sp = sub.add_parser("probe", help="robustness probes on a finished run saved with --save-model",
                        description="Run robustness probes (METHODS §8) on the saved final model of RUN "
                                    "(<run>/model, written by --save-model) and append one eval record "
                                    "each (checkpoint probe:<name>) with its per-row outputs.")
    sp.add_argument("run", help="run id (folder name) or path")
    sp.add_argument("--probes", type=_probe_list, required=True, help=PROBES_HELP)
    sp.add_argument("--probe-opt", nargs="*", metavar="K=V", help=PROBE_OPT_HELP)
    sp.add_argument("--root", default="runs", help="run directory root (default: runs/)")
    sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    sp.set_defaults(func=cmd_probe)

    sp = sub.add_parser("methods", help="list unlearning methods (objectives, combiner, defaults)")
    sp.set_defaults(func=cmd_methods)

    sp = sub.add_parser("runs", help="list run directories, show one, or tabulate their robustness probes")
    sp.add_argument("action", nargs="?", default="list", choices=["list", "show", "robustness"],
                    help="list (default), show RUN, robustness: a markdown table of every probe record under --root")
    sp.add_argument("run", nargs="?", help="run id (folder name) or path, for `show`")
    sp.add_argument("--root", default="runs", help="run directory root (default: runs/)")
    sp.set_defaults(func=cmd_runs)

    sp = sub.add_parser("report", help="execute notebooks with a parameter profile into HTML reports",
                        description="Execute a notebook (or --all) under papermill with a parameter profile: "
                                    "cpu = the notebook's own defaults, smoke / demo / real / gpu = "
                                    "notebooks/params/<profile>/<name>.yaml; writes <out>/<name>-<profile>.ipynb "
                                    "and .html (a failing notebook is kept as .failed.ipynb).")
    sp.add_argument("name", nargs="?", help="notebook name, e.g. alkn_continual (see notebooks/)")
    sp.add_argument("--all", action="store_true", help="every notebook in notebooks/")
    sp.add_argument("--profile", default="cpu", help="cpu (default), smoke, demo, real (SmolLM2-135M on CPU) or gpu")
    sp.add_argument("--out", default="reports", help="report directory (default: reports/)")
    sp.add_argument("--runs", help="runs_root for the notebooks' run directories (default: the profile's)")
    sp.add_argument("-p", "--param", nargs="*", metavar="K=V", help="parameter overrides, e.g. eval_limit=4")
    sp.add_argument("-j", "--jobs", type=int, default=1, help="notebooks at once, each with 1/jobs of the cores")
    sp.add_argument("--reuse-runs", action="store_true",
                    help="take a finished run under the runs root whose config equals a grid entry's instead of "
                         "running it again (e.g. to re-execute a report after a claim's rule changed)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("claims", help="merge the notebooks' claims files into the claims ledger (docs/claims.md)",
                        description="Collect <dir>/*.claims.json (written by `lab report` beside each report) into "
                                    "one markdown ledger: per paper, each claim's verdict and numbers per executed profile.")
    sp.add_argument("--reports", nargs="+", default=["reports"], help="directories with *.claims.json (default: reports/)")
    sp.add_argument("--out", default="docs/claims.md", help="ledger path (default: docs/claims.md)")
    sp.add_argument("--figures", default=None, metavar="DIR",
                    help="also export each executed report's headline figure (its first plotly figure) as "
                         "DIR/<name>-<profile>.png (plotly + kaleido through the system Chromium), e.g. docs/figures")
    sp.add_argument("--figure-profiles", nargs="+", default=["real"], help="profiles whose figures --figures exports "
                    "(default: real)")
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

    for name, sp in sub.choices.items():   # every command that reads benchmark data (added by anyone)
        if name not in ("bench", "bench-eval", "runs", "methods", "claims") and "--data" not in sp._option_string_actions:
            sp.add_argument("--data", metavar="DIR", help="benchmark data folder holding tofu/ and muse_news/ "
                                                          "(sets $LAB_DATA; default: $LAB_DATA, else ../shared/data)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: argparse's REMAINDER does not pass on --options
        from lab import bench
        bench.main(argv[1:])
        return 0
    if argv[:1] == ["bench-eval"]:
        from lab import bench_eval
        bench_eval.main(argv[1:])
        return 0
    debug = "--debug" in argv    # anywhere: `lab --debug unlearn ...` or `lab unlearn ... --debug`
    argv = [a for a in argv if a != "--debug"]
    args = build_parser(show_defaults=bool({"-h", "--help"} & set(argv))).parse_args(argv)
    if getattr(args, "data", None):
        os.environ["LAB_DATA"] = os.path.abspath(os.path.expanduser(args.data))
    if not sys.stderr.isatty():   # logs / CI: no carriage-return streams from the hub's and transformers' bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        args.func(args)
        if "lab.distributed" in sys.modules:   # a launched rank: leave with the others (not for `lab runs`)
            sys.modules["lab.distributed"].finish()
    except BrokenPipeError:   # `lab runs show X | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        print(f"lab {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        code, message = _error_message(e)
        print(f"lab {args.command}: error: {message}", file=sys.stderr)
        return code
    return 0


def _error_message(e: Exception) -> tuple[int, str]:
    """(exit code, one line) for an error: 2 for bad input (names, paths, files, options), 1 for a run
    that stopped or another failure."""
    import yaml
    from lab.runs import RunLocked, RunStopped
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (RunStopped, RunLocked)):
        return 1, text
    if isinstance(e, (ValueError, KeyError, OSError, ImportError, yaml.YAMLError)):
        return 2, text
    return 1, f"{type(e).__name__}: {text} (unexpected; rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
