"""lab.bench: the engine benchmark runs every variant through the real engine step and reports ratios."""
import json

from lab import bench, cli


def test_bench_cli_writes_ratios_and_memory(tmp_path):
    variants = [("graddiff", "ga_rt", 0), ("gru", "gru_gd", 0), ("gru+diag", "gru_gd", 1)]
    result = bench.run_bench("tiny", rounds=2, warmup=1, batch_size=2, max_length=32,
                             variants=variants, progress=False)
    assert set(result["variants"]) == {"floor", "graddiff", "gru", "gru+diag"}
    assert result["variants"]["floor"]["ratio_to_floor"] == 1.0
    traced, untraced = result["variants"]["gru+diag"], result["variants"]["gru"]
    assert traced["ratio_to_untraced"] == traced["median_seconds"] / untraced["median_seconds"]
    assert "ratio_to_untraced" not in untraced
    for entry in result["variants"].values():
        assert entry["median_seconds"] > 0
        assert entry["peak_bytes"] > 0              # the step allocates activations and gradients
    assert "gru+diag" in bench.format_table(result)

    # `lab bench --options` reaches bench's own parser (argparse REMAINDER would reject them)
    assert cli.main(["bench", "--model", "tiny", "--rounds", "1", "--batch-size", "2",
                     "--max-length", "16", "--no-memory", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "tiny-cpu.json").read_text())
    assert written["model"] == "tiny" and "ngdiff+autolr+diag" in written["variants"]
