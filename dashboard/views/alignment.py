"""Alignment A_f = <g_f,d>/||g_f||^2 and A_r = <g_r,d>/||g_r||^2 per step (BLUR eq. 8, fig. 2) for any
method: A > 0 means the step improves that objective to first order."""
import streamlit as st

from dashboard import data, figures

st.title("Alignment")
records = data.selection_or_stop()
trace = data.trace_or_stop(records)
c1, c2 = st.columns([3, 2])
window = c1.slider("Smoothing (moving average over diagnosed steps)", 1, 25, 1, key="alignment_smoothing")
scale = c2.radio("y scale", figures.ALIGN_SCALES, index=1, horizontal=True, key="alignment_scale",
                 help="signed log = sign(A)·log10(1+|A|): keeps the sign regions while methods whose A differ "
                      "by orders of magnitude (NGDiff normalises the gradients) share one axis")
st.plotly_chart(figures.alignment_figure(trace, window, scale), width="stretch")
st.plotly_chart(figures.alignment_scatter(trace, scale), width="stretch")
cols = [c for c in ["run_id", "label", "method", "step", "epoch", "task", "align_f", "align_r", "cos_fr"]
        if c in trace]
data.download_csv(trace[cols].dropna(subset=[c for c in ("align_f", "align_r") if c in trace], how="all"),
                  "alignment.csv", "Download A_f / A_r per step (CSV)")
