"""Which clients each FedLEASE allocation put together in the open-federation comparison, with each client's task and
label mix: its majority class and that class's share of its training examples (recomputed from the seeded
partition; nothing is trained). Prints one line per cluster per seed and allocation, and the JSON of it last.

    python benchmarks/open_federation_label_mix.py [RUNS_FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fedlease.config import RunConfig
from fedlease.data.tasks import get_spec
from fedlease.runtime.clients import load_partition

RUNS = Path(__file__).resolve().parent / "results" / "comparison_open_builtin" / "runs"


def main() -> None:
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    result = []
    for history_path in sorted(runs.glob("fedlease*/seed_*/training_history.json")):
        history = json.loads(history_path.read_text())
        config = RunConfig.from_dict(history["config"])
        _, splits = load_partition(config)
        clustering = history["clustering"]
        clusters: dict[int, list[dict]] = {}
        for cid, k in zip(clustering["clients"], clustering["labels"], strict=True):
            split = splits[cid]
            share = np.bincount([e.label for e in split.train], minlength=get_spec(split.task).num_classes)
            share = share / share.sum()
            clusters.setdefault(k, []).append({"client": cid, "task": split.task, "majority_class": int(share.argmax()),
                                               "majority_share": round(float(share.max()), 2)})
        name = f"{history_path.parent.parent.name} seed {config.seed}"
        print(f"{name}: K = {clustering['num_clusters']}")
        for k in sorted(clusters):
            print(f"  expert {k}: " + " ".join(sorted(f"{c['task'][:4]}:{c['majority_class']}({c['majority_share']})"
                                                      for c in clusters[k])))
        result.append({"run": name, "clusters": {str(k): v for k, v in sorted(clusters.items())}})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
