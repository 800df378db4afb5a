"""Gradient geometry per step: cos(g_f, g_r) (GRU pre/post rectification), realised-update cosines,
gradient norms and the lr with AutoLR probes (METHODS §7)."""
import streamlit as st

from dashboard import data, figures

st.title("Gradient geometry")
records = data.selection_or_stop()
trace = data.trace_or_stop(records)
window = st.slider("Smoothing (moving average over diagnosed steps)", 1, 25, 1, key="geometry_smoothing",
                   help="diagnostics every k steps: only the measured steps are averaged")
st.caption("Forget-only methods (GA, NPO, ...) get g_r from a retain NLL gradient measured beside them on "
           "diagnostic steps; it does not enter the update.")
st.plotly_chart(figures.geometry_figure(trace, window), width="stretch")
st.plotly_chart(figures.norms_figure(trace, window), width="stretch")
st.plotly_chart(figures.lr_figure(trace), width="stretch")
data.download_csv(trace, "trace.csv", "Download the trace (CSV)")
