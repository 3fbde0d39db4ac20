"""benchmarks/gpu.py --quick: the GPU benchmark's every part runs on the CPU with tiny shapes and reports numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_gpu_benchmark_quick_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    written = json.loads(out.read_text())
    assert printed == written
    result = written
    assert result["benchmark"] == "gpu" and result["quick"] is True
    assert result["machine"]["device"] == "cpu"
    assert "not measured" in result["gpu_busy_method"]  # no GPU here: said, not invented
    parts = result["parts"]
    for name in ("encoder", "decoder_135m", "llama7b_build", "llama7b_bf16"):
        assert parts[name]["status"] == "ok", (name, parts[name].get("reason"), parts[name].get("traceback"))
    for name in ("llama7b_4bit", "llama7b_8bit"):  # bitsandbytes needs CUDA: skipped, with the reason
        assert parts[name]["status"] == "skipped" and "CUDA" in parts[name]["reason"]

    encoder = parts["encoder"]
    assert [r["phase"] for r in encoder["rounds"]] == ["warmup"] * 3 + ["adaptive"] * 2
    assert encoder["rounds"][0]["signature_seconds"] > 0  # the data signature is computed in the first round
    assert sum(r["allocate_seconds"] > 0 for r in encoder["rounds"]) == 1  # the allocation ends the warmup
    for phase in ("warmup_training", "adaptive_training"):
        for key in ("seconds_per_step", "examples_per_s", "tokens_per_s", "achieved_tflops"):
            assert positive(encoder[phase][key]), (phase, key)
    for key in ("warmup_round_seconds", "adaptive_round_seconds", "adaptive_over_warmup_round"):
        assert positive(encoder["per_round"][key]), key
    assert positive(encoder["paper_glue_extrapolated"]["minutes"])
    for row in encoder["profile"]:
        assert positive(row["aten_calls_per_step"]), row
    counted = encoder["counted_flops"]
    assert counted["adaptive"]["flops_per_padded_token"] > counted["warmup"]["flops_per_padded_token"] > 0

    for name in ("decoder_135m", "llama7b_bf16"):
        part = parts[name]
        for fit in ("warmup_fit", "adaptive_fit"):
            assert positive(part[fit]["seconds_per_step"]) and positive(part[fit]["tokens_per_s"]), (name, fit)
        assert positive(part["adaptive_fit"]["achieved_tflops"])
        assert positive(part["generation"]["seconds_per_token_overall"]) and part["generation"]["new_tokens"] >= 1
        static = part["generation_static"]  # the static cache: timed, and on the CPU uncompiled, the same answers
        assert positive(static["seconds"]) and static["same_responses"] == 1.0, static
        assert static["compiled_by_transformers"] is False
        assert positive(part["round_estimate"]["adaptive_round_seconds"])
        assert positive(part["signature_seconds"])
        assert all(positive(row.get("aten_calls_per_step", row.get("aten_calls_per_token"))) for row in
                   part["profile"]), part["profile"]

    summary = result["summary"]
    for key in ("encoder_warmup_round_seconds", "encoder_adaptive_round_seconds", "encoder_adaptive_seconds_per_step",
                "paper_glue_minutes", "decoder_135m_adaptive_seconds_per_step",
                "llama7b_bf16_round_seconds_estimate"):
        assert positive(summary[key]), key
