import json
import time

import pandas as pd
import pytest
import torch

from llmopt.bench import datasets, harness


def test_measure_counts_warmup_and_repeats():
    calls = []
    timing = harness.measure(lambda: calls.append(1) or time.sleep(0.01), repeats=4, warmup=2)
    assert len(calls) == 6 and len(timing.wall_s) == 4
    assert timing.median_s >= 0.009 and timing.spread_s >= 0
    summary = timing.summary()
    assert summary["repeats"] == 4 and "cpu_wall_ratio" in summary


def test_sleeping_run_is_flagged_contended():
    timing = harness.measure(lambda: time.sleep(0.02), repeats=2, warmup=0)
    timing.threads = 2
    assert timing.cpu_wall_ratio < 0.5 and timing.contended


def test_spread_is_interquartile_range():
    assert harness.spread([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)
    assert harness.spread([1.0, 3.0]) == 2.0 and harness.spread([1.0]) == 0.0


def test_save_results_adds_environment_atomically(tmp_path):
    path = harness.save_results([{"engine": "x", "tokens_per_s": 1.5}], "unit", extra={"model": "m"},
                                directory=tmp_path)
    frame = pd.read_csv(path)
    for column in ("git_revision", "torch", "transformers", "cpu", "torch_threads", "device", "model"):
        assert column in frame.columns
    assert [p.name for p in tmp_path.iterdir()] == ["unit.csv"]


def test_save_headline_roundtrip(tmp_path):
    path = harness.save_headline("99_x", "T", "1 tok/s", "ok", pd.DataFrame({"a": [1]}), directory=tmp_path)
    record = json.loads(path.read_text())
    assert record["title"] == "T" and record["table"]["columns"] == ["a"]


def test_headline_records_where_the_notebook_ran(tmp_path, monkeypatch):
    """A run with device="cuda" is labeled with its GPU in the headline, the index cards and the README line (a
    GPU run once went out labeled as its host CPU)."""
    from llmopt.bench import environment as env_module
    from llmopt.report import reports

    monkeypatch.setattr(env_module, "device_name",
                        lambda device="cpu": "Test GPU" if "cuda" in str(device) else "Test CPU")
    harness.save_headline("00_baseline", "Baseline", "1 tok/s", "ok", directory=tmp_path, device="cuda")
    record = json.loads((tmp_path / "headline_00_baseline.json").read_text())
    assert record["device"] == "cuda" and record["device_name"] == "Test GPU"
    assert reports.headline_markdown(tmp_path).count("Test GPU (host ") == 1
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "00_baseline.html").write_text("<html></html>")
    index = reports.build_index(tmp_path / "reports", tmp_path).read_text()
    assert "Test GPU (host " in index
    record["timestamp_utc"] = "2020-01-02T03:04:05+00:00"  # a clone gives the report file a new mtime
    (tmp_path / "headline_00_baseline.json").write_text(json.dumps(record))
    assert "generated 2020-01-02 03:04 UTC" in reports.build_index(tmp_path / "reports", tmp_path).read_text()


def test_estimates_cover_every_section_and_are_labeled():
    frame = datasets.estimates()
    assert set(frame.section) == {"kv_cache", "batching", "quantization", "prompt_caching", "flash_attention",
                                  "speculative_decoding"}
    assert (frame.source == "estimate").all()
    assert datasets.estimates("flash_attention").high.tolist() == [1.5, 2.5, 4.0]


def test_verdict_words():
    assert datasets.verdict(7, 5, 10) == "confirmed"
    assert datasets.verdict(20, 5, 10).startswith("refuted (better)") and "2x" in datasets.verdict(20, 5, 10)
    assert datasets.verdict(2, 5, 10).startswith("refuted (worse)")
    assert datasets.verdict(100, 500, 500, higher_is_better=False).startswith("refuted (better)")


def test_evaluation_text_splits_are_disjoint():
    cal, held = datasets.evaluation_text("calibration"), datasets.evaluation_text("heldout")
    assert len(cal) > 100_000 and len(held) > 50_000
    assert held[:2000] not in cal


def test_peak_memory_counts_live_tensors_only():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a @ a  # 4 MB more: 8 MB live
        del a
        c = torch.ones(2000, 1000)  # 8 MB more: 12 MB live at the peak
        return float(b.sum() + c.sum())

    _, peak = harness.peak_memory_bytes(work)
    assert 12_000_000 <= peak < 12_100_000

def test_cpu_peak_memory_counts_nested_allocations_once():
    import torch

    x = torch.ones(1000, 1000)  # 4 MB
    # repeat_interleave allocates through nested ops (clone -> empty_like -> empty): one 8 MB result
    result, peak = harness.peak_memory_bytes(lambda: x.repeat_interleave(2, dim=0))
    assert result.shape == (2000, 1000)
    assert 8_000_000 <= peak < 9_000_000


def test_readme_headline_block_is_generated_with_the_plot(tmp_path):
    from llmopt.report import reports

    results = tmp_path / "results"
    harness.save_headline("00_baseline", "Baseline", "1.0 tok/s", "identical", None, directory=results)
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{reports.HEADLINE_START}\nold\n{reports.HEADLINE_END}\nbottom\n")
    reports.update_readme(results, readme)
    text = readme.read_text()
    assert "old" not in text and "| [Baseline](reports/00_baseline.html) | 1.0 tok/s | identical |" in text
    assert "![" not in text  # no figure saved yet
    (results / reports.README_PLOT).write_bytes(b"png")
    reports.update_readme(results, readme)
    text = readme.read_text()
    assert f"{reports.README_PLOT})" in text and text.startswith("top\n") and text.endswith("bottom\n")


def test_cell_seconds_reads_papermill_durations_slowest_first():
    import nbformat

    from llmopt.report.reports import cell_seconds

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("\nfast = 1"),
                nbformat.v4.new_code_cell("slow = 2\nmore = 3"), nbformat.v4.new_code_cell("untimed = 4")]
    nb.cells[1].metadata["papermill"] = {"duration": 0.5}
    nb.cells[2].metadata["papermill"] = {"duration": 12.25}
    assert cell_seconds(nb) == [(12.25, "slow = 2"), (0.5, "fast = 1")]


def test_warm_bytecode_imports_every_module_and_restores_the_flag(monkeypatch):
    import sys

    from llmopt import cli

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, "llmopt.bench.peers", raising=False)
    cli.warm_bytecode()
    assert sys.dont_write_bytecode is True
    assert {"llmopt.bench.peers", "llmopt.engine.gptq", "seaborn", "papermill"} <= set(sys.modules)
