"""Privacy accounting with Google's dp-accounting library (its Rényi-DP accountant); no DP math is written here.

A run's releases are Gaussian mechanisms of one noise multiplier: every round that releases an aggregate (each
client's whole upload clipped to the clip norm, Gaussian noise of standard deviation noise x clip on every sum),
and every release a single client makes on its own (FedLEASE's noised warmup uploads and data signature). Each
is recorded as a :class:`Release` with the probability that a given client takes part in it: the Poisson rate of
``--sample_rate`` (the library then applies privacy amplification by subsampling), else 1 (a uniform sample of a
fixed size is accounted without amplification, which over-states epsilon; full participation has none).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib.metadata import version

import dp_accounting
from dp_accounting import rdp

ACCOUNTANT = f"dp-accounting {version('dp-accounting')} RdpAccountant (add or remove one client)"
RECORD_ACCOUNTANT = f"dp-accounting {version('dp-accounting')} RdpAccountant (add or remove one example)"
# noise multipliers the calibration searches between
NOISE_RANGE = (1e-3, 1e3)


@dataclass(frozen=True)
class Release:
    """One charged release: its kind (``round``, ``warmup``, ``signature``), the round (0-based) and the
    probability that a given client contributes to it."""

    kind: str
    round: int
    sample_rate: float

    def to_dict(self) -> dict:
        return asdict(self)


def quiet_library() -> None:
    # the RDP accountant warns through absl for every fractional order its series does not converge on (it then
    # leaves that order out, as it should); that is not news to a user
    logging.getLogger("absl").setLevel(logging.ERROR)


def event(noise: float, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise)
    return gaussian if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


def counted(releases: Iterable[Release]) -> dict[float, int]:
    """Releases as the accountant composes them: how many at each sampling rate (their order does not matter)."""
    counts: dict[float, int] = {}
    for release in releases:
        counts[release.sample_rate] = counts.get(release.sample_rate, 0) + 1
    return counts


def composed(noise: float, releases: Iterable[Release]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(event(noise, rate), count)
                                          for rate, count in sorted(counted(releases).items())])


def epsilon(noise: float, releases: Iterable[Release], delta: float) -> float:
    """The epsilon the accountant gives for ``releases`` at ``delta`` (0 when nothing was released)."""
    quiet_library()
    releases = list(releases)
    if not releases:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(composed(noise, releases))
    return float(accountant.get_epsilon(delta))


def calibrate(target_epsilon: float, delta: float, plan: Iterable[Release]) -> float:
    """The smallest noise multiplier whose releases ``plan`` spend at most ``target_epsilon`` at ``delta``."""
    quiet_library()
    plan = list(plan)
    noise = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, lambda sigma: composed(sigma, plan), target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(NOISE_RANGE[0], 1.0), tol=1e-4)
    return float(noise)


def sgd_steps(sample_rate: float, steps: int) -> list[Release]:
    """``steps`` DP-SGD steps of one client (record-level DP): each a Gaussian mechanism on a batch that holds a
    given example with probability ``sample_rate`` (Poisson sampling), charged as the releases above are."""
    return [Release("step", step, sample_rate) for step in range(steps)]
