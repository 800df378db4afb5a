"""Every notebooks/*.ipynb: stored clean (no outputs, one literal-only `parameters` cell, notebook_setup first),
a smoke / demo / gpu parameter file whose keys are all parameters of the notebook, and - slow - a real
execution of the smoke profile through lab.report.run_notebook: no cell error, an HTML report with the
plotly figures inline, and run directories that lab.runs reads back."""
import ast

import nbformat
import numpy as np
import pytest

from lab import claims, report, runs

NAMES = report.list_notebooks()
PROFILES = ("smoke", "demo", "gpu")


def test_the_notebooks_exist():
    assert {"00_quickstart", "alkn_continual"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_with_one_literal_parameters_cell(name):
    nb = nbformat.read(report.notebook_path(name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} have stored outputs / execution counts (strip them)"
    index, source = report.parameters_cell(nb, name)                  # exactly one
    params = report.parse_parameters(source, name)                    # literal assignments only
    assert "runs_root" in params and params["runs_root"] == "runs"   # run dirs where the dashboard looks
    later = [c for c in nb.cells[index + 1:] if c.cell_type == "code"]
    calls = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
             for n in ast.walk(ast.parse(later[0].source)) if isinstance(n, ast.Call)}
    assert "notebook_setup" in calls, f"{name}: the first code cell after the parameters must call notebook_setup()"
    assert all(c.get("id") for c in nb.cells)


@pytest.mark.parametrize("name", NAMES)
def test_papermill_reads_every_parameter_of_the_parameters_cell(name):
    """papermill's own inspection finds every parameter (a second '=' on a line, even in its comment, makes
    it skip the line and warn 'Passed unknown parameter' when a profile sets it)."""
    from papermill.translators import PythonTranslator
    nb = nbformat.read(report.notebook_path(name), as_version=4)
    index, source = report.parameters_cell(nb, name)
    seen = {p.name for p in PythonTranslator.inspect(nb.cells[index])}
    assert seen == set(report.parse_parameters(source, name)), sorted(set(report.parse_parameters(source, name)) - seen)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", NAMES)
def test_every_profile_file_exists_and_names_only_parameters(name, profile):
    assert profile in report.list_profiles(name), f"missing notebooks/params/{profile}/{name}.yaml"
    values = report.profile_parameters(name, profile)       # ValueError on a key the notebook does not define
    assert values, f"notebooks/params/{profile}/{name}.yaml is empty"


def test_a_typo_in_a_profile_file_fails(tmp_path):
    """The check above can fail: a copy of a real notebook with a misspelt key in its smoke file."""
    name = NAMES[0]
    (tmp_path / "params" / "smoke").mkdir(parents=True)
    (tmp_path / f"{name}.ipynb").write_bytes(report.notebook_path(name).read_bytes())
    (tmp_path / "params" / "smoke" / f"{name}.yaml").write_text("runs_rot: elsewhere\n")
    with pytest.raises(ValueError, match=r"unknown parameters \['runs_rot'\]"):
        report.profile_parameters(name, "smoke", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_profile_executes(name, prepared_tiny, tmp_path):
    ipynb, html = report.run_notebook(name, profile="smoke", out=tmp_path, runs_root=tmp_path / "runs")
    nb = nbformat.read(ipynb, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, f"{name}: no plotly figure"
    page = html.read_text()
    assert "plotly.js v" in page and page.count("Plotly.newPlot") >= len(figures)   # library + figures inline
    assert '<script src="http' not in page
    found = runs.find_runs(tmp_path / "runs")
    assert found, f"{name}: no run directory under its runs_root"
    for path in found:
        rec = runs.load_run(path)
        assert not rec.errors and rec.status in ("done", "diverged"), (path, rec.errors, rec.status)
        assert not rec.evals.empty
    listed = runs.list_runs(tmp_path / "runs")
    # every run but a prepare (a MUSE target the notebook fine-tuned into its runs_root) names its method
    assert len(listed) == len(found) and listed.loc[listed["kind"] != "prepare", "method"].notna().all()
    if name == "00_quickstart":   # section 6 ran every family method; PDU traced its dual weight each step
        values = {**report.notebook_parameters(name), **report.profile_parameters(name, "smoke")}
        by_method = {rec.config.get("method"): rec for rec in map(runs.load_run, found)}
        assert set(values["family_methods"]) <= set(by_method), (values["family_methods"], sorted(by_method))
        pdu_trace = by_method["pdu"].trace
        assert len(pdu_trace) == values["family_max_steps"] and pdu_trace["dual_retain_weight"].notna().all()
    if name == "alkn_continual":   # ALKN's MU (App. G): every TOFU continual run scored T-Rouge and MU with it
        tofu = [rec for rec in map(runs.load_run, found)
                if rec.config.get("kind") == "continual" and str(rec.config.get("benchmark")).startswith("tofu")]
        assert tofu
        for rec in tofu:
            util = rec.evals[rec.evals["eval_task"].isna() & ~rec.evals["checkpoint"].str.startswith("probe:")]
            assert "model_utility_trouge" in util and util["model_utility_trouge"].notna().all(), rec.path
        # the probes ride on the table's own sequential runs (no second run of a headline method)
        values = {**report.notebook_parameters(name), **report.profile_parameters(name, "smoke")}
        sequential = [r.config["method"] for r in tofu if r.config.get("protocol") == "sequential"]
        assert sorted(sequential) == sorted(set(sequential)), sequential
        probed = {r.config["method"] for r in tofu if not r.probe_evals.empty}
        assert probed == set(values["probe_methods"]) and values["probes"], (probed, values["probe_methods"])
    if name in ("gru_rectification", "blur_bilevel", "ngdiff_mto"):   # the probes ride on the table's runs
        values = {**report.notebook_parameters(name), **report.profile_parameters(name, "smoke")}
        tofu = [rec for rec in map(runs.load_run, found)
                if rec.config.get("kind") == "unlearn" and str(rec.config.get("benchmark")).startswith("tofu")]
        what = [(r.config["method"], str(r.config.get("method_args")), r.config.get("max_grad_norm"), r.config.get("lr"))
                for r in tofu]
        assert len(what) == len(set(what)), what
        probed = {r.config["method"] for r in tofu if not r.probe_evals.empty}
        want = ({m for b in values["probe_bases"] for m in (b, f"gru_{b}")} if name == "gru_rectification"
                else set(values["probe_methods"]))
        assert probed == want and values["probes"], (probed, want)
    if name in claims.PAPERS and name != "00_quickstart":   # every paper notebook feeds the claims ledger
        ledger = claims.load(tmp_path / f"{name}-smoke.claims.json")
        assert ledger["claims"] and ledger["profile"] == "smoke" and ledger["notebook"] == name


def test_quickstart_family_section_runs_one_method_of_each_family():
    """Section 6 of the quickstart, every profile: registered methods, one per new open-unlearning family
    (by forget objective), and the demo's step budget stays short (at most 10 steps per method)."""
    from lab.methods import get_method
    defaults = report.notebook_parameters("00_quickstart")
    for profile in PROFILES:
        values = {**defaults, **report.profile_parameters("00_quickstart", profile)}
        families = sorted(get_method(m)[0].forget[0].objective for m in values["family_methods"])
        assert families == ["ceu", "pdu", "satimp", "undial"], (profile, values["family_methods"])
    demo = {**defaults, **report.profile_parameters("00_quickstart", "demo")}
    assert demo["family_max_steps"] is not None and 1 <= demo["family_max_steps"] <= 10


@pytest.mark.parametrize("profile", ("cpu", *PROFILES, "real"))
def test_alkn_reports_mu_with_trouge_in_every_profile(profile):
    """ALKN Table 1's MU folds in T-Rouge (ALKN App. G): every profile that reports MU builds the corpus."""
    values = report.notebook_parameters("alkn_continual")
    if profile != "cpu":
        values.update(report.profile_parameters("alkn_continual", profile))
    assert isinstance(values.get("trouge"), dict), f"{profile}: no T-Rouge corpus options (trouge)"


def test_gru_gpu_profile_sets_tau_per_base_as_gru_appendix_d():
    """GRU App. D.1, TOFU with Phi-1.5: tau 0.001 by default and no gradient clipping for GD."""
    values = report.profile_parameters("gru_rectification", "gpu")
    assert values["model"] == "microsoft/phi-1_5"
    tau = {b: values.get("gru_tau_per_base", {}).get(b, values["gru_tau"]) for b in values["bases"]}
    assert tau.pop("gd") is None
    assert set(tau.values()) == {0.001}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "00_quickstart"])
def test_real_profiles_start_from_their_documented_smollm2_prepare(name):
    """Every paper notebook's `real` profile starts from a documented cached SmolLM2 prepare (README "Real
    model": `lab prepare --model smollm2-135m --bench-opt n_retain_authors=5 n_forget_authors=5 extras=false
    --set eval_limit=30`, the default recipe), and its runs score rows that prepare's evaluations hold (so no
    notebook fine-tunes or re-evaluates the starting point)."""
    from lab.prepare import cache_keys, prepare_config
    values = report.profile_parameters(name, "real")
    assert values["model"] == "smollm2-135m" and values["benchmark"] == "tofu_subset"
    readme = prepare_config("smollm2-135m", "tofu_subset", {"n_retain_authors": 5, "n_forget_authors": 5,
                                                            "extras": False}, eval_limit=30)
    ours = prepare_config(values["model"], values["benchmark"], values["benchmark_kwargs"],
                          **values.get("prepare_kwargs", {}))
    assert cache_keys(ours) == cache_keys(readme)
    assert values["eval_limit"] <= readme["eval_limit"]


def test_real_profiles_with_muse_start_from_the_documented_smollm2_muse_target():
    """A `real` profile that runs its MUSE section starts it from the README's SmolLM2 MUSE target (`lab prepare
    --model smollm2-135m --benchmark muse_news --bench-opt max_docs=12 --set eval_limit=3 batch_size=4`), the
    key lab.engine's starting_point "prepared" computes, and scores only items that target's evaluation holds."""
    from lab.prepare import cache_keys, prepare_config
    readme = prepare_config("smollm2-135m", "muse_news", {"max_docs": 12}, eval_limit=3, batch_size=4)
    with_muse = []
    for name in [n for n in NAMES if n != "00_quickstart"]:
        values = {**report.notebook_parameters(name), **report.profile_parameters(name, "real")}
        if not values.get("run_muse") or not values.get("muse_methods", values.get("muse_bases")):
            continue
        with_muse.append(name)
        options = {k: v for k, v in values["muse_prepare"].items() if k != "starting_point"}
        ours = prepare_config(values["muse_model"], "muse_news", values["muse_benchmark_kwargs"],
                              eval_limit=values["muse_eval_limit"], **options)
        assert values["muse_prepare"]["starting_point"] == "prepared" and cache_keys(ours) == cache_keys(readme), name
    assert "blur_bilevel" in with_muse   # BLUR Table 3 runs at the real profile


@pytest.mark.slow
def test_a_notebook_runs_its_engine_calls_in_ranks_with_parallel_and_nproc(prepared_tiny, tmp_path):
    """parallel fsdp + nproc 2: every run of the notebook is started by torchrun in 2 ranks (the probes on
    rank 0), and the table it prints equals the one-process notebook's (world-size invariance)."""
    cut = dict(methods=["gdiff(0.5)", "ngdiff_autolr"], run_autolr_ablation=False, run_c_sweep=False,
               run_lr_sweep=False, probes=["quant8"], probe_methods=["ngdiff_autolr"])
    finals = {}
    for how in ("one", "ranks"):
        par = {"parallel": "fsdp", "nproc": 2} if how == "ranks" else {}
        report.run_notebook("ngdiff_mto", profile="smoke", out=tmp_path / how, runs_root=tmp_path / how / "runs",
                            params={**cut, **par}, progress=False)
        recs = [runs.load_run(p) for p in runs.find_runs(tmp_path / how / "runs")]
        recs = [r for r in recs if r.config.get("kind") == "unlearn"]
        assert {r.config.get("world_size") for r in recs} == ({2} if how == "ranks" else {1}), how
        finals[how] = {(r.config["method"], checkpoint): g.iloc[-1][["forget_prob", "model_utility"]].to_numpy(float)
                       for r in recs for checkpoint, g in r.evals.groupby("checkpoint") if checkpoint != "initial"}
    assert finals["one"].keys() == finals["ranks"].keys() and ("ngdiff_autolr", "probe:quant8") in finals["one"]
    for key, value in finals["one"].items():
        np.testing.assert_allclose(finals["ranks"][key], value, rtol=1e-3, atol=1e-5, err_msg=str(key))
