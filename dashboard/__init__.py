"""The lab's Streamlit dashboard: `streamlit run dashboard/app.py [-- --runs PATH]` (or `make dashboard`).

app.py (sidebar run picker + st.navigation), views/ (one page each), data.py (cached run loading via
lab.runs), figures.py (pure DataFrame -> plotly functions), screenshots.py (headless Chromium captures).
"""
