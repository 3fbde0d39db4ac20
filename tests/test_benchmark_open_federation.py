"""benchmarks/open_federation.py --quick: the scale benchmark runs end to end and reports what it claims to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "open_federation.py"


def test_open_federation_benchmark_quick_measures_each_size(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model_name", tiny_model, "--",
                           "--max_batch_tokens", "64"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["extra_run_args"] == ["--max_batch_tokens", "64"]
    assert [run["clients"] for run in result["runs"]] == [8, 40]
    for run in result["runs"]:
        assert run["clients_per_round"] == 4 and run["rounds_measured"] == 1
        assert run["peak_rss_mb"] > 100 and run["seconds_per_round_after_allocation"] > 0
        assert run["experts"] >= 1
    ratio = result["ratio_largest_vs_smallest"]
    assert ratio["peak_rss"] == result["runs"][1]["peak_rss_mb"] / result["runs"][0]["peak_rss_mb"]
    assert result["allocation"]["clients"] == 200 and result["allocation"]["seconds"] > 0
    # at 40 clients nearly every sampled client is new after the allocation: its placement is timed and set apart
    large = result["runs"][1]
    assert large["clients_placed_per_round"] >= 1
    assert 0 < large["placement_seconds_per_round"] < large["seconds_per_round_after_allocation"]
    assert large["seconds_per_round_placements_apart"] == pytest.approx(
        large["seconds_per_round_after_allocation"] - large["placement_seconds_per_round"])
    assert ratio["seconds_per_round_placements_apart"] == pytest.approx(
        large["seconds_per_round_placements_apart"] / result["runs"][0]["seconds_per_round_placements_apart"])


def test_arguments_after_a_double_dash_reach_every_run(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model_name", tiny_model, "--",
                           "--max_batch_tokens", "-1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "--max_batch_tokens must be zero or positive" in proc.stderr
