"""Per-row inspection: one forget / retain / ... question with its ground truth and every selected model's
generation (the initial target and each run's unlearned checkpoints)."""
import pandas as pd
import streamlit as st

from dashboard import data
from lab import runs_views

st.title("Per-row inspection")
records = data.selected_records()
if not records:
    st.info("Pick runs in the sidebar.")
    st.stop()
runs_rows = [(rec, data.load_rows(rec)) for rec in records]
data.warn_problems(records)
frames = [rows for _, rows in runs_rows if not rows.empty and {"set", "row"} <= set(rows.columns)]
if not frames:
    st.info("The selected runs have no per-row outputs (eval_rows.parquet) yet.")
    st.stop()
everything = pd.concat([f[["set", "row"]] for f in frames], ignore_index=True).drop_duplicates()
sets = sorted(everything["set"].unique(), key=lambda s: (s != "forget", s != "retain", s))
c1, c2 = st.columns([1, 3])
set_name = c1.selectbox("Set", sets, key="rows_set")
# rows every selected run evaluated come first (unlearned evals may use eval_limit rows)
counts = everything[everything["set"] == set_name].assign(n=1).groupby("row")["n"].count()
available = [int(r) for r in counts.index]
row = c2.selectbox("Row", available, key="rows_row")
table = runs_views.generations_table(runs_rows, set_name, row)
if table.empty:
    st.info("No run evaluated this row.")
    st.stop()
first = table.iloc[0]
st.markdown(f"**Question** ({set_name} row {row})")
st.write(first.get("question", ""))
st.markdown("**Ground truth**")
st.write(first.get("answer", ""))
metrics = [c for c in ("rouge", "prob", "truth_ratio", "exact_memorization", "extraction_strength") if c in table]
SHORT = {"exact_memorization": "EM", "extraction_strength": "ES"}
st.dataframe(table.drop(columns=[c for c in ("question", "answer", "generation") if c in table]),
             hide_index=True, width="stretch")
st.markdown("**Generations**")
for _, r in table.iterrows():
    with st.container(border=True):
        where = " · ".join(f"{k} {r[k]:g}" if isinstance(r[k], float) else f"{k} {r[k]}"
                           for k in ("task", "step") if k in r and pd.notna(r[k]))
        scores = " · ".join(f"{SHORT.get(m, m)} {r[m]:.3f}" for m in metrics if pd.notna(r[m]))
        st.markdown(f"**{r['label']}** — {r['checkpoint']}" + (f" ({where})" if where else "")
                    + (f" — {scores}" if scores else ""))
        text = r.get("generation")
        st.text(text if isinstance(text, str) else "(no generation for this set)")
data.download_csv(table, f"rows_{set_name}_{row}.csv", "Download this row's generations (CSV)")
all_rows = pd.concat([rows.assign(run_id=rec.run_id, label=runs_views.run_label(rec))
                      for rec, rows in runs_rows if not rows.empty], ignore_index=True)
data.download_csv(all_rows, "eval_rows.csv", "Download every per-row output of the selected runs (CSV)")
