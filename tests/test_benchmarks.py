"""Every script under benchmarks/ runs: each quick mode in a subprocess, on tiny settings, into a temporary folder.

A script that is not run here is listed in ``NOT_RUN`` with the reason, and a new script that is in neither
fails ``test_every_benchmark_is_run_here_or_says_why_not``, so a benchmark cannot rot unnoticed. benchmarks/gpu.py
and benchmarks/open_federation.py have modules of their own (test_benchmark_gpu.py,
test_benchmark_open_federation.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"
RUN_HERE = {"end_to_end.py", "expert_layer.py", "memory.py", "edit_copy_baseline.py", "allocation_table.py"}
ELSEWHERE = {"gpu.py": "tests/test_benchmark_gpu.py", "open_federation.py": "tests/test_benchmark_open_federation.py"}
NOT_RUN = {
    "device_open_comparison.sh": "runs the open-federation comparison on a lent GPU machine (hours of runs)",
    "deployment.py": "starts a real Flower SuperLink and SuperNodes and times them; the deployment itself is tested "
                     "in test_flower.py",
    "allocation_diagnostics.py": "no quick mode yet (issue 35)",
    "batch_grouping.py": "no quick mode yet (issue 35)",
    "decoder_throughput.py": "no quick mode yet (issue 35)",
    "label_skew_signature.py": "no quick mode yet (issue 35)",
    "merge_comparison.py": "no quick mode yet (issue 35)",
    "open_federation_label_mix.py": "no quick mode yet (issue 35)",
    "private_allocation.py": "no quick mode yet (issue 35)",
    "rss_timeline.py": "no quick mode yet (issue 35)",
    "test_prompt_cut.py": "no quick mode yet (issue 35)",
}


def run_script(name: str, *args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(cwd)}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_benchmark_is_run_here_or_says_why_not():
    scripts = {path.name for path in BENCHMARKS.iterdir() if path.suffix in (".py", ".sh")}
    listed = RUN_HERE | set(ELSEWHERE) | set(NOT_RUN)
    assert scripts == listed, {"not listed": sorted(scripts - listed), "gone": sorted(listed - scripts)}
    assert not RUN_HERE & set(NOT_RUN)


def test_end_to_end_measures_throughput_and_splits_every_round(tiny_model, tmp_path):
    result = last_json(run_script("end_to_end.py", "--quick", "--model_name", tiny_model, cwd=tmp_path))
    assert result["benchmark"] == "end_to_end" and result["quick"] is True
    assert set(result["samples_per_s"]) == {"ours", "peft_same_batches", "peft_random_batches"}
    assert all(rate > 0 for rate in result["samples_per_s"].values())
    assert [row["round"] for row in result["round_split"]] == [1, 2]  # a warmup round and an adaptive one
    for row in result["round_split"]:
        assert row["train"] > 0 and row["evaluate"] > 0 and row["total"] >= row["train"]
    assert "cluster" in result["round_split"][0]  # the allocation ends the warmup


def test_expert_layer_times_every_expert_count(tmp_path):
    result = last_json(run_script("expert_layer.py", "--quick", cwd=tmp_path))
    assert result["benchmark"] == "expert_layer" and result["repeats"] == 8
    assert set(result["results"]) == {"m1", "m2", "m4", "m8"}
    assert result["results"]["m1"]["reference_ms"] is None and result["speedup_vs_reference_m4"] > 0


def test_memory_measures_each_federation_size(tiny_model, tmp_path):
    result = last_json(run_script("memory.py", "--quick", "--model_name", tiny_model, cwd=tmp_path))
    assert result["benchmark"] == "memory" and result["samples_per_client"] == 16
    assert result["peak_rss_mb_16_clients"] > 100 and result["peak_rss_mb_4_clients"] > 100
    assert result["rss_ratio_16_vs_4"] == result["peak_rss_mb_16_clients"] / result["peak_rss_mb_4_clients"]


def test_edit_copy_baseline_scores_every_kind_of_edit(tmp_path):
    report = json.loads(run_script("edit_copy_baseline.py", cwd=tmp_path).stdout)
    assert report["all"]["examples"] == sum(row["examples"] for key, row in report.items() if key != "all")
    assert report["all"]["examples"] > 0


def test_allocation_table_reads_the_committed_diagnostics(tmp_path):
    files = sorted(str(path) for path in (BENCHMARKS / "results" / "allocation").glob("bi_*_s1.json"))
    assert files
    proc = run_script("allocation_table.py", *files, cwd=tmp_path)
    assert "|" in proc.stdout and "ARI" in proc.stdout
