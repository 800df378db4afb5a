"""Dashboard entry: `streamlit run dashboard/app.py [-- --runs PATH]`.

The sidebar picks a runs root (text input; default --runs, else $LAB_RUNS, else `runs`), an experiment
(config.yaml `experiment`: the notebook and section, or --tag, that made the runs; default the latest),
filters its runs by benchmark / method / model / protocol / kind and selects the runs every page shows
(their paths are in st.session_state["selected_runs"]). Pages live in dashboard/views/ (not pages/, so
Streamlit's automatic multipage mode stays off and st.navigation decides the order).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repository root
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import streamlit as st  # noqa: E402

from dashboard import data  # noqa: E402
from lab import runs_views  # noqa: E402

VIEWS = Path(__file__).parent / "views"
PAGES = [  # (file, title, icon, url path)
    ("overview.py", "Overview", ":material/table_view:", "overview"),
    ("geometry.py", "Gradient geometry", ":material/explore:", "geometry"),
    ("alignment.py", "Alignment", ":material/balance:", "alignment"),
    ("tradeoffs.py", "Trade-offs", ":material/scatter_plot:", "tradeoffs"),
    ("robustness.py", "Robustness", ":material/shield:", "robustness"),
    ("continual.py", "Continual", ":material/timeline:", "continual"),
    ("masks.py", "Mask overlap", ":material/grid_on:", "masks"),
    ("rows.py", "Per-row inspection", ":material/search:", "rows"),
]
FILTER_KEYS = ["benchmark", "method", "model", "protocol", "kind"]
MAX_DEFAULT_RUNS = 12
EXPERIMENT_KEY, ALL_RUNS = "experiment", "(all runs)"


def default_root() -> str:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs")
    args, _ = parser.parse_known_args(sys.argv[1:])   # other argv (e.g. pytest's under AppTest) ignored
    return args.runs or os.environ.get("LAB_RUNS") or "runs"


def _keep_valid(key: str, options: list) -> None:
    """Drop values no longer offered (root or filters changed) before the widget is built."""
    if key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]


def sidebar() -> None:
    sb = st.sidebar
    if data.ROOT_KEY not in st.session_state:
        st.session_state[data.ROOT_KEY] = default_root()
    root = sb.text_input("Runs root", key=data.ROOT_KEY, help="folder of run directories (lab.runs)")
    if not Path(root).is_dir():
        sb.error(f"Runs root `{root}` is not a folder. Give the path of a runs directory "
                 "(e.g. `runs`, or start with `streamlit run dashboard/app.py -- --runs PATH`).")
        st.session_state[data.SELECTED_KEY] = []
        return
    records = data.load_root(root)
    table = runs_views.runs_table(records).assign(path=[str(r.path) for r in records])
    if table.empty:
        sb.info(f"No runs under `{root}` yet.")
    mask = [True] * len(table)
    experiments = runs_views.experiment_options(table)
    if len(experiments) > 1 or (experiments and experiments[0] != runs_views.UNTAGGED):
        # many runs (a demo makes ~35): one experiment at a time, the latest by default
        choices = [ALL_RUNS, *experiments]
        if st.session_state.get(EXPERIMENT_KEY) not in choices:
            st.session_state[EXPERIMENT_KEY] = experiments[0]
        chosen = sb.selectbox("Experiment", choices, key=EXPERIMENT_KEY,
                              format_func=lambda e: f"↳ {e.split('/', 1)[1]}" if "/" in e else e,
                              help="notebook (and section) or --tag that made the runs (config.yaml `experiment`)")
        if chosen != ALL_RUNS:
            mask = runs_views.in_experiment(table, chosen).tolist()
    for key in FILTER_KEYS:
        values = sorted({str(v) for v in table[key].dropna()}) if len(table) else []
        if len(values) < 2:
            continue
        _keep_valid(f"filter_{key}", values)
        chosen = sb.multiselect(key.capitalize(), values, key=f"filter_{key}", placeholder="all")
        if chosen:
            mask = [m and str(v) in chosen for m, v in zip(mask, table[key])]
    shown = table[mask]
    options = shown["path"].tolist()
    labels = dict(zip(table["path"], table["label"] + " · " + table["status"].astype(str)))
    signature = (root, tuple(options))
    if st.session_state.get("_picker_signature") != signature or data.SELECTED_KEY not in st.session_state:
        # new root or filters: default to the (non-'prepare') runs they show
        picked = [p for p, k in zip(shown["path"], shown["kind"]) if k != "prepare"] or options
        st.session_state[data.SELECTED_KEY] = picked[-MAX_DEFAULT_RUNS:]
        st.session_state["_picker_signature"] = signature
    _keep_valid(data.SELECTED_KEY, options)
    sb.multiselect(f"Runs ({len(options)} of {len(table)})", options, key=data.SELECTED_KEY,
                   format_func=lambda p: labels.get(p, p), help="runs shown (overlaid) on every page")
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    sb.caption(" · ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs")


st.set_page_config(page_title="Unlearning lab", page_icon=":material/science:", layout="wide")
sidebar()
nav = st.navigation([st.Page(VIEWS / f, title=t, icon=i, url_path=u, default=(f == "overview.py"))
                     for f, t, i, u in PAGES])
nav.run()
