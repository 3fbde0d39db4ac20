"""Tables from allocation_diagnostics.py JSON files: per setting and signature, the distances within / between
tasks, the chosen K and the ARI of the chosen clustering and at the true K (mean over the files of a setting,
i.e. over seeds), and for the no-structure settings (one task) which K each min-silhouette threshold chooses.

    python benchmarks/allocation_table.py benchmarks/results/allocation/*.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3)


def fmt(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for path in args.files:
        result = json.loads(Path(path).read_text())
        by_setting[re.sub(r"_s\d+$", "", result["label"] or Path(path).stem)].append(result)
    print("| setting | seeds | round | signature | distance within / between task | chosen K | best silhouette "
          "| ARI chosen | ARI at true K |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, results in sorted(by_setting.items()):
        seeds = " ".join(str(r["seed"]) for r in results)
        rounds = sorted({row["round"] for r in results for row in r["rounds"]})
        for rnd in rounds:
            rows = [row for r in results for row in r["rounds"] if row["round"] == rnd]
            for name in rows[0]["signatures"]:
                sig = [row["signatures"][name] for row in rows if name in row["signatures"]]
                ks = " ".join(str(s["chosen_k"]) for s in sig)
                print(f"| {setting} | {seeds} | {rnd} | {name} | {fmt([s['within'] for s in sig], 3)} / "
                      f"{fmt([s['between'] for s in sig], 3)} | {ks} | "
                      f"{fmt([max(s['silhouette'].values()) for s in sig], 3)} | "
                      f"{fmt([s['ari_chosen'] for s in sig])} | {fmt([s.get('ari_true_k') for s in sig])} |")
    print()
    print("Best silhouette against --min_silhouette: the K each threshold gives (1 = one expert), per seed.")
    print()
    print("| setting | round | signature | best silhouette per seed | " + " | ".join(f"K at {t}" for t in THRESHOLDS)
          + " |")
    print("|---|---|---|---|" + "---|" * len(THRESHOLDS))
    for setting, results in sorted(by_setting.items()):
        for rnd in sorted({row["round"] for r in results for row in r["rounds"]}):
            rows = [row for r in results for row in r["rounds"] if row["round"] == rnd]
            for name in rows[0]["signatures"]:
                sig = [row["signatures"][name] for row in rows if name in row["signatures"]]
                best = [max(s["silhouette"].values()) for s in sig]
                cells = [" ".join(str(s["chosen_k"] if b >= t else 1) for s, b in zip(sig, best, strict=True))
                         for t in THRESHOLDS]
                print(f"| {setting} | {rnd} | {name} | {' '.join(f'{b:.3f}' for b in best)} | "
                      + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
