"""Utility vs forgetting: one point per run, one per task for continual runs (NGDiff fig. 1 / ALKN fig. 4),
Pareto front marked, the run's config on hover."""
import streamlit as st

from dashboard import data, figures
from lab import runs_views

st.title("Trade-offs")
records = data.selection_or_stop()


def present(metrics):
    found = set()
    for rec in records:
        if rec.evals is not None and not rec.evals.empty:
            found |= {m for m in metrics if m in rec.evals and rec.evals[m].notna().any()}
    return [m for m in metrics if m in found]


utilities, forgettings = present(runs_views.UTILITY_METRICS), present(runs_views.FORGET_METRICS)
if not utilities or not forgettings:
    st.info("The selected runs have no evaluation records yet (eval.jsonl).")
    st.stop()
c1, c2, c3 = st.columns([2, 2, 1])
utility = c1.selectbox("Utility (y)", utilities, key="tradeoff_utility")
forgetting = c2.selectbox("Forgetting (x)", forgettings, key="tradeoff_forgetting")
change = c3.checkbox("as change from initial", key="tradeoff_change",
                     help="x = how much the metric moved towards forgetting since the initial model (ALKN fig. 4)")
points = runs_views.tradeoff_table(records, utility, forgetting, change=change)
fig = figures.tradeoff_figure(points, utility, forgetting, change=change)   # directions: runs_views.METRICS
st.plotly_chart(fig, width="stretch")
st.dataframe(points.drop(columns=["hover"]), hide_index=True, width="stretch")
data.download_csv(points.drop(columns=["hover"]), "tradeoffs.csv")
