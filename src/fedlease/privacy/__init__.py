"""Client-level differential privacy: DP-FedAvg for every method, with accounting by a maintained library.

``--dp_clip C`` turns it on. Each client clips the change of its whole upload to L2 norm C
(``mechanism.clip_change``); the server adds Gaussian noise of standard deviation sigma x C to the sum of every
aggregate (each expert of each cluster, each router, each averaged head, a shared adapter) and divides by the
expected number of contributors, with equal weights (``mechanism.NoisyMean``). ``--dp_noise sigma`` sets the
noise multiplier, or ``--dp_epsilon E --dp_delta D`` calibrates it before round 1 for the run's whole plan of
releases. What a method releases, round by round, is its ``privacy_plan``; the accountant
(``accounting``: dp-accounting's RDP accountant, Poisson subsampling at ``--sample_rate``) charges each round's
releases as the round ends, and the ledger (``PrivacyLedger``) records the epsilon spent in
training_history.json under ``privacy``.

``--dp_unit record`` protects one training example of one client instead: DP-SGD on each client's local training
(``record``: Opacus' DPOptimizer clips each example's gradient to --dp_clip and noises each step, dp-accounting
charges each client's Poisson-sampled steps); the server adds no noise. ``enabled`` is client-level DP only.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from fedlease.config import DP_UNITS, RunConfig
from fedlease.errors import ConfigError
from fedlease.privacy.accounting import ACCOUNTANT, Release, calibrate, epsilon
from fedlease.privacy.mechanism import NoisyMean
from fedlease.runtime.participation import unseen_clients

RECORD_DELTA = 1e-5  # --dp_delta's default with --dp_unit record (FFA-LoRA's)
LOCAL_NOISE = "dp_local_noise"  # Instruction.extra: the client noises its clipped upload itself (its own release)


def enabled(config: RunConfig) -> bool:
    """Client-level DP (DP-FedAvg) is on."""
    return config.dp_clip is not None and config.dp_unit == "client"


def record_level(config: RunConfig) -> bool:
    """Record-level DP (DP-SGD on every client) is on."""
    return config.dp_clip is not None and config.dp_unit == "record"


def accounting_rate(config: RunConfig) -> float:
    """The probability with which a client takes part in a round, as the accountant may use it: the Poisson
    rate; 1 for a fixed-size uniform sample (not amplified here) and for full participation."""
    return config.sample_rate if config.sample_rate is not None else 1.0


def expected_fraction(config: RunConfig) -> float:
    """The share of a group's trainable clients expected to contribute to a round."""
    if config.sample_rate is not None:
        return config.sample_rate
    if config.clients_per_round:
        return config.clients_per_round / (config.num_clients - len(unseen_clients(config)))
    return 1.0


def expected_contributors(config: RunConfig, members: Iterable[int]) -> float:
    """How many of ``members`` (client ids; the held-out newcomers never train) a round is expected to hear from:
    fixed by the sampling and the group before the round, never by who replied."""
    held = set(unseen_clients(config))
    return expected_fraction(config) * sum(1 for cid in members if cid not in held)


def check_privacy(config: RunConfig) -> None:
    """Refuse DP settings that cannot work, with one line each (before anything is written)."""
    dp_flags = {name: getattr(config, name) for name in ("dp_noise", "dp_epsilon", "dp_delta")}
    if config.dp_unit not in DP_UNITS:
        raise ConfigError(f"--dp_unit must be one of {', '.join(DP_UNITS)}, got {config.dp_unit!r}")
    record = config.dp_unit == "record"
    if config.dp_clip is None:
        given = [f"--{name}" for name, value in dp_flags.items() if value is not None]
        if record:
            given.insert(0, "--dp_unit record")
        if given:
            raise ConfigError(f"{' '.join(given)} without --dp_clip: differential privacy starts with a clip norm")
        return
    for name, value in (("dp_clip", config.dp_clip), *dp_flags.items()):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name} must be a positive number, got {value}")
    if config.method == "local":
        raise ConfigError("--dp_clip with --method local: a local client sends nothing, there is nothing to protect")
    if config.max_update_norm is not None:
        if record:
            raise ConfigError("--max_update_norm with --dp_unit record: the change norm a client reports for the "
                              "bound is computed outside DP-SGD and would leave the DP guarantee")
        raise ConfigError("--max_update_norm with --dp_clip: the DP clip already bounds every client's change, and "
                          "the change norm a client reports for the bound would leave it outside the DP guarantee")
    if config.dp_epsilon is not None and config.dp_noise is not None:
        raise ConfigError("--dp_epsilon calibrates the noise and --dp_noise sets it: pass one of them")
    if config.dp_epsilon is None and config.dp_noise is None:
        raise ConfigError("--dp_clip needs --dp_noise (the noise multiplier) or --dp_epsilon (a budget to meet)")
    if record:
        check_record(config)
    elif config.dp_delta is not None and config.dp_delta >= 1 / config.num_clients:
        raise ConfigError(f"--dp_delta {config.dp_delta} is at least 1/{config.num_clients} clients: a delta that "
                          f"large allows one client's data to be released outright; take it well below 1/clients")
    if config.dp_epsilon is not None and config.dp_delta is None:
        raise ConfigError("--dp_epsilon needs --dp_delta (for example 1e-5)")


def check_record(config: RunConfig) -> None:
    """Record-level DP's own refusals."""
    examples = int(config.train_samples)  # 0: all of a task's examples, known once the data is read
    if config.dp_delta is not None and (config.dp_delta >= 1 or (examples and config.dp_delta >= 1 / examples)):
        raise ConfigError(f"--dp_delta {config.dp_delta} is at least 1/{examples or 1} training examples per "
                          f"client: a delta that large allows one example to be released outright; take it well "
                          f"below 1/examples (for example 1e-5)")


def delta(config: RunConfig) -> float:
    """The delta epsilon is reported at: --dp_delta, else 1/(10 x clients) (client level) or 1e-5 (record
    level)."""
    if config.dp_delta is not None:
        return config.dp_delta
    return RECORD_DELTA if config.dp_unit == "record" else 1 / (10 * config.num_clients)


@functools.cache
def _noise(clip: float, noise: float | None, target: float | None, delta_: float, plan: tuple[Release, ...]
           ) -> float:
    return noise if noise is not None else calibrate(target, delta_, plan)


def noise_multiplier(config: RunConfig, plan: Iterable[Release]) -> float:
    """--dp_noise, or the noise that --dp_epsilon calibrates for ``plan`` (the same in every process)."""
    return _noise(config.dp_clip, config.dp_noise, config.dp_epsilon, delta(config), tuple(plan))


class PrivacyLedger:
    """The server's side of a DP run: the noise of its aggregates and the accounting of its releases."""

    def __init__(self, config: RunConfig, plan: Iterable[Release]) -> None:
        self.config = config
        self.plan = list(plan)
        self.noise = noise_multiplier(config, self.plan)
        self.delta = delta(config)
        self.noisy = NoisyMean(config.dp_clip, self.noise, secrets.randbits(62))
        self.charged: list[Release] = []

    def begin(self, rnd: int) -> None:
        self.noisy.round = rnd

    def charge(self, rnd: int) -> float:
        """Charge the releases of round ``rnd`` (0-based); return the epsilon spent so far."""
        self.charged = [r for r in self.plan if r.round <= rnd]
        return self.spent()

    def spent(self) -> float:
        return epsilon(self.noise, self.charged, self.delta)

    def record(self) -> dict[str, Any]:
        """What training_history.json keeps under ``privacy``."""
        kinds: dict[str, int] = {}
        for release in self.charged:
            kinds[release.kind] = kinds.get(release.kind, 0) + 1
        return {"epsilon": self.spent(), "delta": self.delta, "noise_multiplier": self.noise,
                "clip": self.config.dp_clip, "sample_rate": accounting_rate(self.config),
                "amplified": self.config.sample_rate is not None,
                "rounds": kinds.get("round", 0), "releases": kinds, "accountant": ACCOUNTANT,
                "target_epsilon": self.config.dp_epsilon, "planned_epsilon": epsilon(self.noise, self.plan, self.delta)}

    def state_dict(self) -> dict[str, Any]:
        return {"secret": self.noisy.secret, "charged": len(self.charged)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noisy.secret = int(state["secret"])
        self.charged = self.plan[: int(state["charged"])]
