"""Mask overlap of continual (ALKN) runs: Jaccard between task masks, globally and per layer / module type;
active fraction per task (and per layer); realised task-vector density/sparsity of every continual run."""
import streamlit as st

from dashboard import data, figures
from lab import runs_views

st.title("Mask overlap")
records = data.continual_selection_or_stop("No continual runs among the selection: masks come from `lab continual` (ALKN methods).")

diag = runs_views.task_diagnostics_table(records)
st.plotly_chart(figures.task_fraction_figure(diag), width="stretch")
if not diag.empty:
    data.download_csv(diag, "task_diagnostics.csv", "Download per-task diagnostics (CSV)")

with_masks = [r for r in records if r.masks is not None and not r.masks.empty]
if not with_masks:
    st.info("None of the selected continual runs wrote masks.parquet (only ALKN methods build task masks, "
            "and only once two tasks are done).")
    st.stop()
labels = {runs_views.run_label(r): r for r in with_masks}
rec = labels[st.selectbox("Run", list(labels), key="masks_run")]
overlap = rec.masks
scopes = sorted(overlap["scope"].unique(), key=figures._scope_key)
scope = st.selectbox("Scope", scopes, key="masks_scope", help="global, one layer, or one module type")
c1, c2 = st.columns(2)
c1.plotly_chart(figures.jaccard_heatmap(overlap, scope), width="stretch")
c2.plotly_chart(figures.scope_heatmap(overlap), width="stretch")
by = st.radio("Active fraction by", ["layer", "module"], horizontal=True, key="masks_by")
counts = data.load_mask_counts(rec)
st.plotly_chart(figures.layer_active_heatmap(runs_views.layer_active_table(counts, by),
                                             f"Mask active fraction per {by}"), width="stretch")
data.download_csv(runs_views.mask_overlap_table(with_masks), "mask_overlap.csv", "Download mask overlap (CSV)")
