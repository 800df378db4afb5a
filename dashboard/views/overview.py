"""Overview: every run under the root with status and read problems, and the selected runs' final metrics."""
import streamlit as st

from dashboard import data, figures
from lab import runs_views

st.title("Runs")
root = st.session_state.get(data.ROOT_KEY, "runs")
everything = data.load_root(root)
table = runs_views.runs_table(everything)
if table.empty:
    st.info(f"No run directories under `{root}`. Create some with `lab unlearn`, `lab continual` or `lab demo`.")
    st.stop()

status = table["status"].value_counts()
cols = st.columns(4)
cols[0].metric("runs", len(table))
cols[1].metric("done", int(status.get("done", 0)))
cols[2].metric("running", int(status.get("running", 0)))
cols[3].metric("broken / failed", int(len(table) - status.get("done", 0) - status.get("running", 0)))
data.warn_problems(everything)

selected = {str(r.path) for r in data.selected_records()}
table.insert(0, "selected", [str(r.path) in selected for r in everything])
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"errors": st.column_config.TextColumn(width="large")})
data.download_csv(table, "runs.csv")

records = data.selected_records()
if not records:
    st.info("Pick runs in the sidebar to compare their metrics and losses.")
    st.stop()
picked = runs_views.runs_table(records)
st.subheader("Selected runs")
st.plotly_chart(figures.metrics_bar_figure(picked, runs_views.UNIT_METRICS), width="stretch")
window = st.slider("Smoothing (moving average over steps)", 1, 25, 1, key="overview_smoothing")
trace = runs_views.trace_table(records)
st.plotly_chart(figures.loss_figure(trace, window), width="stretch")
data.download_csv(trace, "trace.csv", "Download the selected runs' trace (CSV)")
