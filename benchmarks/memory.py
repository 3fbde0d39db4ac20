"""Peak resident memory of a short FedLEASE run with 4 and with 16 clients (clients share one backbone).

Each run is a separate process (``fedlease run`` on the offline encoder and built-in tasks: 2 rounds, 1 of
warmup, so the adaptive phase with its experts is included); its peak RSS is read from the kernel
(``ru_maxrss`` of the finished child). Prints one JSON object as the last line of stdout; ``--quick`` uses
fewer examples per client (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time

CHILD = ("import resource, sys\n"
         "from fedlease.cli import main\n"
         "code = main(sys.argv[1:])\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"  # KiB on Linux
         "sys.exit(code)\n")


def peak_rss_mb(clients_per_task: int, samples: int) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of one run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        tasks = ("rotten_tomatoes", "snli", "newsgroups", "election_tweets")
        args = ["run", "--tasks", *(f"{task}:{clients_per_task}" for task in tasks),
                "--global_rounds", "2", "--warmup_rounds", "1", "--local_epochs", "1", "--train_samples", str(samples),
                "--test_samples", str(max(8, samples // 4)), "--batch_size", "32", "--output_dir", f"{tmp}/run",
                "--no_progress"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        return int(proc.stdout.strip().splitlines()[-1]) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples per client (under a minute)")
    args = parser.parse_args()
    samples = 16 if args.quick else 200
    rss4, s4 = peak_rss_mb(1, samples)
    rss16, s16 = peak_rss_mb(4, samples)
    result = {"benchmark": "memory", "samples_per_client": samples, "peak_rss_mb_4_clients": rss4,
              "peak_rss_mb_16_clients": rss16, "rss_ratio_16_vs_4": rss16 / rss4,
              "seconds": {"4_clients": s4, "16_clients": s16},
              "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    print(f"4 clients: {rss4:.0f} MB, 16 clients: {rss16:.0f} MB, ratio {rss16 / rss4:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
