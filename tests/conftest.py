"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) against ../shared/data.

LAB_CACHE defaults to <repo>/.cache/lab: entries there are content-hashed (tokenizer, converted
SmolLM2, prepared target/retain models), so test workers and later runs (and `make demo`) reuse
them safely; `lab.prepare` holds a file lock so two xdist workers never train the same models twice.
"""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LAB_CACHE", str(REPO / ".cache" / "lab"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see lab/__init__.py


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("LAB_DATA", REPO.parent / "shared" / "data"))
    if not (path / "tofu" / "full.json").exists():
        pytest.skip(f"OFFLINE BENCHMARK DATA MISSING at {path}: these tests need ../shared/data "
                    "(or $LAB_DATA) - this is a set-up problem, not a pass")
    return path


@pytest.fixture(scope="session")
def prepared_tiny():
    """The embedded default: tiny target + retain models on tofu_subset (the same cache entry as
    `make demo`). First call trains both (a few minutes on 2 cores); later calls load the cache."""
    from lab.prepare import cache_root, prepare
    # the prepare run beside the cache it fills (a pytest tmp dir is deleted while the cache lives on)
    return prepare(model="tiny", benchmark="tofu_subset", verbose=False, runs_root=cache_root() / "test-runs")


@pytest.fixture(scope="session")
def browser_available(request):
    """The system Chromium + chromedriver (Debian packages; .ci/run installs them). Missing: the test skips
    LOUDLY with the reason (apt-get install -y chromium chromium-driver), never silently."""
    from dashboard import screenshots
    try:
        screenshots.browser_paths()
    except screenshots.BrowserMissing as e:
        pytest.skip(f"BROWSER NOT INSTALLED - {request.node.name} did not run: {e}")


@pytest.fixture
def crashing_task(monkeypatch):
    """crash(run, task=1): call run() with lab.continual's per-task loop raising 'simulated crash' at `task`
    (expects the RunStopped it gives), then restore the real loop; for the resume tests."""
    from lab import continual, runs

    def crash(run, task=1):
        real = continual.unlearning_loop

        def loop(*args, **kwargs):
            if kwargs.get("task") == task:
                raise RuntimeError("simulated crash")
            return real(*args, **kwargs)
        monkeypatch.setattr(continual, "unlearning_loop", loop)
        try:
            with pytest.raises(runs.RunStopped, match="simulated crash"):
                run()
        finally:
            monkeypatch.setattr(continual, "unlearning_loop", real)
    return crash
