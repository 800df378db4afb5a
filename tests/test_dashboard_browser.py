"""End to end: `streamlit run dashboard/app.py` on a free port, the system Chromium (headless, Selenium +
Debian chromedriver) loads every page over the fixture runs: Plotly charts drawn, no exception box, one
screenshot per page in the test's tmp_path. Skipped - loudly, with the apt-get command - only when the
browser is not installed."""
from __future__ import annotations

import pytest

from dashboard import screenshots

from dashboard_fixtures import dashboard_runs  # noqa: F401  (session fixture)

MIN_CHARTS = {"overview": 2, "geometry": 3, "alignment": 2, "tradeoffs": 1, "robustness": 3, "continual": 3, "masks": 4, "rows": 0}


@pytest.mark.slow
def test_every_page_renders_in_chromium(browser_available, dashboard_runs, tmp_path):
    log = tmp_path / "streamlit.log"
    results = screenshots.capture_all(dashboard_runs["root"], tmp_path, log_path=log, timeout=90)
    by_page = {r["page"]: r for r in results}
    assert list(by_page) == list(MIN_CHARTS)
    for page, want in MIN_CHARTS.items():
        r = by_page[page]
        assert r["exceptions"] == 0, (page, log.read_text()[-2000:])
        assert r["plots"] == want and r["drawn"] >= want, (page, r)
        png = tmp_path / f"dashboard-{page}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, page


def test_missing_browser_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setattr(screenshots, "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(screenshots.BrowserMissing, match="apt-get install -y chromium chromium-driver"):
        screenshots.browser_paths()
