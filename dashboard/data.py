"""Cached run loading for the dashboard. Every read goes through lab.runs (RunRecord) / lab.runs_views.

A record is cached under (run path, signature of its files: name, mtime, size), so a run still being
written is re-read as soon as one of its files changes and an unchanged run is never parsed twice.
Nothing here trains or loads a model (and torch is never imported).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from lab import runs, runs_views

ROOT_KEY, SELECTED_KEY = "runs_root", "selected_runs"


def file_signature(path: str | os.PathLike) -> tuple:
    """(name, mtime_ns, size) of the run's files, its masks/ folder included: the cache key."""
    path = Path(path)
    out = []
    for folder in (path, path / "masks"):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.is_file() and not e.name.startswith("."):
                info = e.stat()
                out.append((f"{folder.name}/{e.name}" if folder != path else e.name, info.st_mtime_ns, info.st_size))
    return tuple(sorted(out))


@st.cache_data(show_spinner=False, max_entries=1024)
def _record(path: str, signature: tuple) -> runs.RunRecord:  # signature: cache key only
    return runs.load_run(path)


@st.cache_data(show_spinner=False, max_entries=64)
def _rows(path: str, signature: tuple) -> tuple[pd.DataFrame, list[str]]:
    rec = load_record(path)      # cached; .rows reads eval_rows.parquet lazily
    rows = rec.rows
    return rows, [e for e in rec.errors if runs.EVAL_ROWS in e]


@st.cache_data(show_spinner=False, max_entries=256)
def _mask_counts(path: str, signature: tuple) -> tuple[pd.DataFrame, list[str]]:
    rec = load_record(path)
    return runs_views.read_mask_counts(rec), rec.errors


def load_record(path) -> runs.RunRecord:
    """The run at `path`, re-read only when one of its files changed."""
    return _record(str(path), file_signature(path))


def load_rows(rec: runs.RunRecord) -> pd.DataFrame:
    """Per-row eval outputs (eval_rows.parquet) of a run; an unreadable file adds to rec.errors."""
    p = Path(rec.path) / runs.EVAL_ROWS
    sig = (p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
    rows, errors = _rows(str(rec.path), sig)
    rec.errors.extend(e for e in errors if e not in rec.errors)
    return rows


def load_mask_counts(rec: runs.RunRecord) -> pd.DataFrame:
    p = Path(rec.path) / runs_views.MASK_COUNTS
    sig = (p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
    counts, errors = _mask_counts(str(rec.path), sig)
    rec.errors.extend(e for e in errors if runs_views.MASK_COUNTS in e and e not in rec.errors)
    return counts


def load_root(root: str | os.PathLike) -> list[runs.RunRecord]:
    """Every run directory under root (lab.runs.find_runs), each from the cache when unchanged."""
    return [load_record(p) for p in runs.find_runs(root)]


def selected_records() -> list[runs.RunRecord]:
    """The runs picked in the sidebar (app.py stores their paths in st.session_state)."""
    return [load_record(p) for p in st.session_state.get(SELECTED_KEY, []) if Path(p).is_dir()]


def continual_records() -> tuple[list[runs.RunRecord], list[runs.RunRecord]]:
    """(selected continual runs, selected runs whose kind is unknown because config.yaml is unreadable):
    pages about continual runs warn about both."""
    recs = selected_records()
    kind = [(r.config or {}).get("kind") for r in recs]
    return [r for r, k in zip(recs, kind) if k == "continual"], [r for r, k in zip(recs, kind) if not k]


def selection_or_stop() -> list[runs.RunRecord]:
    """The page prologue: the picked runs with their problems warned about; stops the page if none."""
    records = selected_records()
    if not records:
        st.info("Pick runs in the sidebar.")
        st.stop()
    warn_problems(records)
    return records


def trace_or_stop(records) -> pd.DataFrame:
    """All trace rows of the runs (runs_views.trace_table); stops the page if there are none yet."""
    trace = runs_views.trace_table(records)
    if trace.empty:
        st.info("The selected runs have no trace rows yet.")
        st.stop()
    return trace


def continual_selection_or_stop(empty_message: str) -> list[runs.RunRecord]:
    """The picked continual runs (problems warned about, also of runs of unknown kind); stops if none."""
    records, unknown_kind = continual_records()
    warn_problems(unknown_kind)
    if not records:
        st.info(empty_message)
        st.stop()
    warn_problems(records)
    return records


def warn_problems(records) -> None:
    """One warning per selected run that is broken, still being written or not finished cleanly."""
    for rec in records:
        label = runs_views.run_label(rec)
        if rec.errors:
            prefix = f"{rec.path}{os.sep}"
            errors = "; ".join(e.replace(prefix, "") for e in rec.errors)
            st.warning(f"**{label}** (`{rec.run_id}`): {len(rec.errors)} unreadable/missing file(s), the rest "
                       f"is shown. {errors}", icon=":material/warning:")
        elif rec.status == "running":
            st.warning(f"**{label}** (`{rec.run_id}`) is still being written (status running, "
                       f"{len(rec.trace)} trace rows so far); rerun the page to refresh.",
                       icon=":material/hourglass_top:")
        elif rec.status != "done":
            err = rec.status_note   # lab.runs: a stale run's vanished writer, a stopped run's error
            st.warning(f"**{label}** (`{rec.run_id}`): status {rec.status}" + (f" - {err}" if err else ""),
                       icon=":material/warning:")


def download_csv(df: pd.DataFrame, name: str, label: str | None = None) -> None:
    """A CSV download button for a table the page shows (key derived from the file name)."""
    st.download_button(label or f"Download {name} (CSV)", df.to_csv(index=False).encode("utf-8"),
                       file_name=name, mime="text/csv", key=f"download-{name}", disabled=df.empty)
