"""Robustness of forgetting (METHODS §8, lab.probes): per run, forget ROUGE-L / Prob of the final model vs
under each probe (relearning attack, 4/8-bit weights, paraphrased and few-shot prompts) with the target
and the retain model's floor, the recovery fractions, and utility vs recovery."""
import streamlit as st

from dashboard import data, figures
from lab import runs_views

st.title("Robustness")
records = data.selection_or_stop()
table = runs_views.robustness_table(records)
if table.empty:
    st.info("The selected runs have no probe records. Run probes with the unlearning, e.g. "
            "`lab unlearn --method npo_gd --probes relearn,quant8,quant4,paraphrase,fewshot`, or later with "
            "`lab probe RUN --probes relearn` on a run saved with `--save-model`.")
    st.stop()
c1, c2 = st.columns([1, 1])
metric = c1.radio("Forget metric", ["rouge", "prob"], horizontal=True, key="robustness_metric",
                  format_func=lambda m: {"rouge": "ROUGE-L recall", "prob": "Prob"}[m])
probe = c2.selectbox("Probe for the trade-off", list(dict.fromkeys(table["probe"])), key="robustness_probe")
st.plotly_chart(figures.robustness_figure(table, metric), width="stretch")
st.caption("Every value is on the probe's own forget rows: for relearn the held-out rows (the attack rows "
           "are never evaluated), otherwise the run's evaluated forget rows. The floor is the retain model, "
           "which never saw the forget set (for relearn: after the same attack).")
st.plotly_chart(figures.recovery_figure(table, metric), width="stretch")
st.plotly_chart(figures.robustness_tradeoff_figure(table, probe, metric), width="stretch")
st.dataframe(table, hide_index=True, width="stretch")
data.download_csv(table, "robustness.csv")
