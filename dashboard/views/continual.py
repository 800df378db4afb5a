"""Continual runs: per-task forget curves, utility after each task (sequential vs independent vs joint)
and cascading degradation (ALKN fig. 2a: task k's forget probability before vs after the earlier tasks)."""
import streamlit as st

from dashboard import data, figures
from lab import runs_views

st.title("Continual unlearning")
records = data.continual_selection_or_stop("No continual runs among the selection (create one with `lab continual`).")
long = runs_views.continual_table(records)
if long.empty:
    st.info("The selected continual runs have no evaluation records yet.")
    st.stop()
per_task = sorted(long.loc[long["eval_task"].notna(), "metric"].unique())
utility = sorted(long.loc[long["eval_task"].isna(), "metric"].unique())
c1, c2 = st.columns(2)
forget_metric = c1.selectbox("Per-task metric", per_task, key="continual_metric",
                             index=per_task.index("forget_rouge") if "forget_rouge" in per_task else 0)
util_metric = c2.selectbox("Utility metric", utility, key="continual_utility",
                           index=utility.index("model_utility") if "model_utility" in utility else 0)
st.plotly_chart(figures.continual_forget_figure(long, forget_metric), width="stretch")
st.plotly_chart(figures.continual_utility_figure(long, util_metric), width="stretch")
casc_metric = "forget_prob" if "forget_prob" in per_task else forget_metric
cascade = runs_views.cascading_table(records, casc_metric)
st.plotly_chart(figures.cascading_figure(cascade, casc_metric), width="stretch")
st.subheader("Per-task table")
for rec in records:
    st.caption(runs_views.run_label(rec))
    st.dataframe(runs_views.task_table(rec), width="stretch")
data.download_csv(long, "continual.csv", "Download all continual eval records, long form (CSV)")
