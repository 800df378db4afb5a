"""Screenshots of every dashboard page from a runs root, through the system Chromium (headless).

    python -m dashboard.screenshots --runs runs-docs --out docs      # docs/dashboard-<page>.png

Starts `streamlit run dashboard/app.py` on a free localhost port, waits for /_stcore/health, then drives
/usr/bin/chromium with the Debian /usr/bin/chromedriver through Selenium (never a browser download):
each page is loaded, waited on until the app is idle and its Plotly charts are drawn, checked for
exception boxes, and saved as a full-height PNG. The browser test (tests/test_dashboard_browser.py)
uses the same functions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
APT_HINT = "sudo apt-get install -y chromium chromium-driver"
# url path ("" = default page) -> file-name stem; the order of app.PAGES
PAGES = {"": "overview", "geometry": "geometry", "alignment": "alignment", "tradeoffs": "tradeoffs",
         "robustness": "robustness", "continual": "continual", "masks": "masks", "rows": "rows"}
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars"]


class BrowserMissing(RuntimeError):
    pass


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) of the system packages, or BrowserMissing naming the apt-get command."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        raise BrowserMissing(f"{' and '.join(missing)} not installed; install the Debian packages: {APT_HINT}")
    return CHROMIUM, CHROMEDRIVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """terminate, wait up to `timeout` s, then kill: a server started for a page or a test never outlives it."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve(runs_root, port: int | None = None, timeout: float = 90.0, log_path=None):
    """Run the dashboard on localhost:<port> for the with-block; yields its base URL."""
    port = port or free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    from lab.report import STREAMLIT_FLAGS   # localhost only, no usage statistics, whatever the cwd
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port), *STREAMLIT_FLAGS,
           "--", "--runs", str(Path(runs_root).resolve())]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {proc.returncode} before serving"
                                   + (f"; log: {log_path}" if log_path else ""))
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"ok":
                        break
            if time.time() > deadline:
                raise TimeoutError(f"streamlit did not answer {url}/_stcore/health within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        stop_process(proc, timeout=10)
        if log is not subprocess.DEVNULL:
            log.close()


@contextlib.contextmanager
def browser(width: int = 1440, height: int = 1000):
    """A headless system Chromium (fresh profile, removed afterwards) driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium, driver_path = browser_paths()
    os.environ.setdefault("SE_OFFLINE", "true")      # Selenium Manager must never download anything
    profile = tempfile.mkdtemp(prefix="lab-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# what "idle" means: the app rendered, the script is not running, nothing is a loading skeleton and the
# number of drawn Plotly charts stopped changing
_STATE_JS = """
const q = s => document.querySelectorAll(s);
const status = q('[data-testid="stStatusWidget"]');
const running = Array.from(status).some(e => /running|connecting/i.test(e.innerText || ''));
return {app: q('[data-testid="stApp"]').length, main: q('[data-testid="stMain"] [data-testid="stElementContainer"]').length,
        running: running, skeletons: q('[data-testid="stSkeleton"]').length,
        plots: q('.js-plotly-plot').length, drawn: q('.js-plotly-plot .main-svg').length,
        exceptions: q('[data-testid="stException"]').length};
"""


def wait_idle(driver, timeout: float = 60.0, settle: int = 3, poll: float = 0.5) -> dict:
    """Poll the page until it is idle for `settle` consecutive polls; returns the last state."""
    deadline, stable, last = time.time() + timeout, 0, None
    while time.time() < deadline:
        state = driver.execute_script(_STATE_JS)
        idle = state["app"] and state["main"] and not state["running"] and not state["skeletons"] \
            and state["drawn"] >= state["plots"]
        stable = stable + 1 if idle and state == last else 0
        if stable >= settle:
            return state
        last = state
        time.sleep(poll)
    raise TimeoutError(f"page {driver.current_url} not idle after {timeout:.0f} s (last state {last})")


def _content_height(driver) -> int:
    return int(driver.execute_script("""
        const els = [document.querySelector('[data-testid="stMain"]'),
                     document.querySelector('[data-testid="stAppViewContainer"]'), document.body];
        return Math.max(...els.filter(e => e).map(e => e.scrollHeight));"""))


def capture(driver, url: str, path, *, width: int = 1440, max_height: int = 6000, timeout: float = 60.0) -> dict:
    """Load url, wait until idle, grow the window to the page height, save a PNG; returns the page state."""
    driver.set_window_size(width, 1000)
    driver.get(url)
    wait_idle(driver, timeout)
    height = min(max(_content_height(driver) + 80, 900), max_height)
    driver.set_window_size(width, height)
    state = wait_idle(driver, timeout)       # charts re-layout at the new size
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return {**state, "url": url, "path": str(path), "height": height}


def capture_all(runs_root, out_dir, pages=None, *, log_path=None, timeout: float = 60.0) -> list[dict]:
    """Screenshot every page (or `pages`, file stems) of the dashboard over runs_root into
    out_dir/dashboard-<page>.png. Raises if a page shows an exception box."""
    wanted = {u: s for u, s in PAGES.items() if pages is None or s in pages}
    unknown = set(pages or []) - set(PAGES.values())
    if unknown:
        raise ValueError(f"unknown pages {sorted(unknown)}; valid: {list(PAGES.values())}")
    results = []
    with serve(runs_root, log_path=log_path) as url, browser() as driver:
        for path, stem in wanted.items():
            t0 = time.time()
            state = capture(driver, f"{url}/{path}", Path(out_dir) / f"dashboard-{stem}.png", timeout=timeout)
            state.update(page=stem, seconds=round(time.time() - t0, 1))
            results.append(state)
            if state["exceptions"]:
                raise RuntimeError(f"page {stem}: {state['exceptions']} exception box(es) in the app "
                                   f"(see {state['path']})")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard.screenshots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs", help="runs root the dashboard shows (default: runs)")
    ap.add_argument("--out", default="docs", help="folder for dashboard-<page>.png (default: docs)")
    ap.add_argument("--pages", nargs="*", help=f"subset of {list(PAGES.values())}")
    ap.add_argument("--log", help="write the streamlit server log here")
    args = ap.parse_args(argv)
    if not Path(args.runs).is_dir():
        ap.error(f"--runs {args.runs}: not a folder of run directories")
    try:
        results = capture_all(args.runs, args.out, args.pages, log_path=args.log)
    except BrowserMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps({k: r[k] for k in ("page", "path", "plots", "exceptions", "height", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
