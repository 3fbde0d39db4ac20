"""Tabulate finished runs kept in several `fedlease compare` output folders as one comparison.

When the methods and seeds of one comparison ran as several `fedlease compare` commands (in parallel, or in
different sessions), this gathers every finished run (`<folder>/<method>/seed_<n>/training_history.json`), checks
that all were made with the same settings apart from the method's own and the seed, and writes
`comparison.md / .csv / .png` with `fedlease compare`'s own table code (a row per method, mean ± std over the
seeds it has, each row naming its seeds when they differ). It trains nothing.

    python benchmarks/merge_comparison.py --into OUT FOLDER [FOLDER ...] --methods fedit fedlease:top_k=2 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlease.compare import MethodSpec, parse_spec
from fedlease.config import RunConfig
from fedlease.report.comparison import MethodResult, write_comparison
from fedlease.runtime.simulation import config_changes

PER_RUN = {"method", "seed", "output_dir"}  # the settings that differ between the runs of one comparison


def check_same_comparison(spec: MethodSpec, config: RunConfig, first: tuple[MethodSpec, RunConfig],
                          where: Path) -> None:
    """Refuse a run that is not ``spec``'s (another method, or without its settings), or that was made with
    settings other than the first run's, beyond the two methods' own (e.g. ``rank`` for ``fedit:rank=16``)."""
    wrong = [f"method {config.method}"] if config.method != spec.method else []
    wrong += [f"{name} {getattr(config, name)}" for name, value in spec.overrides.items()
              if getattr(config, name) != value]
    if wrong:
        raise SystemExit(f"{where}: not a run of {spec.label} ({', '.join(wrong)})")
    first_spec, first_config = first
    own = PER_RUN | set(spec.overrides) | set(first_spec.overrides)
    changes = config_changes(config, {k: v for k, v in first_config.to_dict().items() if k not in own})
    if changes:
        raise SystemExit(f"{where} was made with other settings than {first_spec.label}'s first run: "
                         + ", ".join(changes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--into", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", required=True,
                        help="the method specs as `fedlease compare` was given them, in table order")
    args = parser.parse_args()

    found: dict[str, dict[int, tuple[Path, dict]]] = {}
    for folder in args.folders:
        for path in sorted(folder.glob("*/seed_*/training_history.json")):
            history = json.loads(path.read_text())
            if not history.get("final"):
                continue  # unfinished
            seed = int(path.parent.name.removeprefix("seed_"))
            runs = found.setdefault(path.parent.parent.name, {})
            if seed in runs:
                raise SystemExit(f"{path.parent.parent.name} seed {seed} finished twice: {runs[seed][0].parent} "
                                 f"and {path.parent}; pass the folders that hold one of them")
            runs[seed] = (path, history)
    results, first = [], None
    for text in args.methods:
        spec = parse_spec(text)
        runs = found.get(spec.folder, {})
        if not runs:
            print(f"{text}: no finished run; left out")
            continue
        result = MethodResult(spec.label)
        for seed, (path, history) in sorted(runs.items()):
            config = RunConfig.from_dict(history["config"])
            first = first or (spec, config)
            check_same_comparison(spec, config, first, path.parent)
            result.add(seed, history, sum(r["seconds"] for r in history["rounds"]))
        results.append(result)
        print(f"{text}: seeds {' '.join(map(str, result.seeds))}")
    if first is None:
        raise SystemExit("no finished run in " + " ".join(map(str, args.folders)))
    args.into.mkdir(parents=True, exist_ok=True)
    print(write_comparison(args.into, results, first[1]))


if __name__ == "__main__":
    main()
