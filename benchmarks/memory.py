"""Peak resident memory of a short FedLEASE run with 4 and with 16 clients (clients share one backbone).

Each run is a separate process (``fedlease run`` on the offline encoder and built-in tasks: 2 rounds, 1 of
warmup, so the adaptive phase with its experts is included); its peak RSS is read from the kernel
(``ru_maxrss`` of the finished child). Measured at the defaults and again with ``--no_attention_dropout``
(PyTorch's fused CPU attention kernel runs only without attention dropout). Prints one JSON object as the last
line of stdout; ``--quick`` uses fewer examples per client and only the defaults (under a minute on 2 cores).
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


def peak_rss_mb(clients_per_task: int, samples: int, extra: tuple[str, ...] = (), model_name: str = "auto"
                ) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of one run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        tasks = ("rotten_tomatoes", "snli", "newsgroups", "election_tweets")
        args = ["run", "--tasks", *(f"{task}:{clients_per_task}" for task in tasks),
                "--global_rounds", "2", "--warmup_rounds", "1", "--local_epochs", "1", "--train_samples", str(samples),
                "--test_samples", str(max(8, samples // 4)), "--batch_size", "32", "--output_dir", f"{tmp}/run",
                "--model_name", model_name, "--no_progress", *extra]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        return int(proc.stdout.strip().splitlines()[-1]) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples per client (under a minute)")
    parser.add_argument("--model_name", default="auto",
                        help="the encoder (default: the offline MiniLM; the test suite passes a tiny one)")
    args = parser.parse_args()
    samples = 16 if args.quick else 200
    result: dict = {"benchmark": "memory", "samples_per_client": samples}
    for suffix, extra in (("", ()), ("_no_attention_dropout", ("--no_attention_dropout",)))[: 1 if args.quick else 2]:
        rss4, s4 = peak_rss_mb(1, samples, extra, args.model_name)
        rss16, s16 = peak_rss_mb(4, samples, extra, args.model_name)
        result.update({f"peak_rss_mb_4_clients{suffix}": rss4, f"peak_rss_mb_16_clients{suffix}": rss16,
                       f"rss_ratio_16_vs_4{suffix}": rss16 / rss4,
                       f"seconds{suffix}": {"4_clients": s4, "16_clients": s16}})
        print(f"{' '.join(extra) or 'defaults'}: 4 clients {rss4:.0f} MB, 16 clients {rss16:.0f} MB, "
              f"ratio {rss16 / rss4:.3f}", flush=True)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
