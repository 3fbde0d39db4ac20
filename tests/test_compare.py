"""`fedlease compare`: every method on the same partition, one table, honest about spread and traffic."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import tiny_run_config
from fedlease.cli import main
from fedlease.compare import compare, parse_spec
from fedlease.config import METHOD_NAMES
from fedlease.errors import ConfigError


def test_compare_tabulates_every_method_and_task(tiny_model, tmp_path):
    base = tiny_run_config(tiny_model, tmp_path / "cmp", global_rounds=2, num_clusters=2)
    specs = [*METHOD_NAMES, "fedit:rank=16", "fedlease:top_k=1"]
    table = compare(base, specs, [3, 4], progress=False)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header = rows[0]
    assert "rotten_tomatoes" in header and "snli" in header and "avg" in header
    for spec in specs:
        assert any(row.startswith(f"| {spec} |") for row in rows), spec
    assert "±" in table  # two seeds: mean ± std
    with (tmp_path / "cmp" / "comparison.csv").open() as handle:
        records = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(records) == set(specs)
    assert float(records["local"]["upload_per_client_round_mean"]) == 0.0
    assert float(records["fedit:rank=16"]["upload_per_client_round_mean"]) > \
        float(records["fedit"]["upload_per_client_round_mean"])
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    # every method saw the same partition
    partitions = set()
    for spec in ("fedlease", "ifca"):
        history = json.loads((tmp_path / "cmp" / spec / "seed_3" / "training_history.json").read_text())
        partitions.add(json.dumps(history["clients"]))
    assert len(partitions) == 1


def test_method_specs():
    spec = parse_spec("fedlease:num_experts=4,top_k=2")
    assert (spec.method, spec.overrides) == ("fedlease", {"num_experts": 4, "top_k": 2})
    assert parse_spec("fedit:target_modules=query").overrides == {"target_modules": ["query"]}
    for bad, match in (("fedit:rank=x", "not a valid int"), ("fedit:ranks=4", "known setting"),
                       ("fedit:seed=3", "same for every method")):
        with pytest.raises(ConfigError, match=match):
            parse_spec(bad)


def test_compare_checks_every_spec_before_running(capsys, tmp_path):
    code = main(["compare", "--methods", "fedit", "nonsense", "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
