"""Tabulate finished runs kept in several `fedlease compare` output folders as one comparison.

When the methods and seeds of one comparison ran as several `fedlease compare` commands (in parallel, or in
different sessions), this gathers every finished run (`<folder>/<method>/seed_<n>/training_history.json`), checks
that all were made with the same settings apart from the method's own and the seed, and writes
`comparison.md / .csv / .png` with `fedlease compare`'s own table code (a row per method, mean ± std over the
seeds it has, each row naming its seeds when they differ). It trains nothing.

    python benchmarks/merge_comparison.py --into OUT FOLDER [FOLDER ...] [--methods fedit fedlease ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlease.compare import parse_spec
from fedlease.config import RunConfig
from fedlease.report.comparison import MethodResult, write_comparison

SHAPING = ("tasks", "train_samples", "test_samples", "batch_size", "global_rounds", "local_epochs", "lr", "rank",
           "model_name", "data_dir", "partition", "alpha", "pair_encoding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--into", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=None, help="method specs, in table order (default: all)")
    args = parser.parse_args()

    found: dict[str, dict[int, dict]] = {}
    for folder in args.folders:
        for path in sorted(folder.glob("*/seed_*/training_history.json")):
            history = json.loads(path.read_text())
            if not history.get("final"):
                continue  # unfinished
            seed = int(path.parent.name.removeprefix("seed_"))
            found.setdefault(path.parent.parent.name, {}).setdefault(seed, history)
    specs = args.methods or sorted(found)
    results, base = [], None
    for text in specs:
        spec = parse_spec(text)
        runs = found.get(spec.folder, {})
        if not runs:
            print(f"{text}: no finished run; left out")
            continue
        result = MethodResult(spec.label)
        for seed, history in sorted(runs.items()):
            config = RunConfig.from_dict(history["config"])
            shaping = {name: getattr(config, name) for name in SHAPING}
            if base is None:
                base, reference = config, shaping
            elif shaping != reference:
                raise SystemExit(f"{text} seed {seed} was run with other settings than the first run")
            result.add(seed, history, sum(r["seconds"] for r in history["rounds"]))
        results.append(result)
        print(f"{text}: seeds {' '.join(map(str, result.seeds))}")
    args.into.mkdir(parents=True, exist_ok=True)
    print(write_comparison(args.into, results, base))


if __name__ == "__main__":
    main()
