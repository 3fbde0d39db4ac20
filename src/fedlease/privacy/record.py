"""Record-level differential privacy (``--dp_unit record``): DP-SGD on each client's local training.

What is protected is one training example of one client (add-or-remove-one-example adjacency). Every local step
of every local training call is a DP-SGD step (``LocalClient.fit`` with a :class:`DPSGD`): a batch is a Poisson
sample of the client's examples (each independently with probability q = batch size / examples), every example's
gradient comes from one batched pass (``per_example``: Opacus' hooks and a grad sampler for the expert layer;
``per_sample_gradients`` here, one forward and backward pass per example, is the exact reference the tests and
``benchmarks/dp_step_cost.py`` hold it to) and is handed to Opacus' ``DPOptimizer``, which clips each to
``--dp_clip``, adds Gaussian noise of standard deviation noise x clip to their sum and divides by the expected
batch size before the wrapped AdamW steps. The batches and the noise are drawn
from the client's own secret seed (its store's ``privacy.secret``, never the public ``--seed``), so the server
cannot replay them; dropout keeps its public seed.

Accounting is dp-accounting's RDP accountant (``accounting``), per client: its steps so far are each a
Poisson-sampled Gaussian mechanism of its noise multiplier at its rate q. ``--dp_noise`` sets the noise
multiplier; ``--dp_epsilon`` calibrates each client's before its first training, for every round of the run
(``planned_steps``). The client keeps its noise multiplier and step count in its store (``NOISE``, ``STEPS``), so a
resumed run accounts the same, and reports them with its epsilon in each update's metrics; the server's
:class:`RecordLedger` keeps the run's record. Everything a client uploads is post-processing of DP-SGD: the server
adds no noise and clips nothing. The one thing a method computes from all of a client's data at once, FedLEASE's
data signature, is a Gaussian release of its own at the client's noise multiplier (``FederatedMethod.
record_releases``; ``DPSGD.released``), charged in the same accountant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizer

from fedlease.config import RunConfig
from fedlease.privacy import delta as run_delta
from fedlease.privacy.accounting import RECORD_ACCOUNTANT, Release, calibrate, epsilon, sgd_steps
from fedlease.seeding import derive_seed

STEPS = "privacy.record.steps"  # a client's store: DP-SGD steps taken so far
NOISE = "privacy.record.noise"  # a client's store: its noise multiplier, fixed before its first training
RELEASES = "privacy.record.releases"  # a client's store: its releases outside DP-SGD so far (FedLEASE's signature)
# what a client reports in each update's metrics (public numbers: no data beyond what q already tells)
EPSILON_METRIC = "record_epsilon"
METRICS = ("dp_noise", "dp_sample_rate", "dp_steps", "dp_round_steps", "dp_releases", "dp_round_releases",
           EPSILON_METRIC)


def sample_rate(batch_size: int, examples: int) -> float:
    """A client's Poisson rate q: each example is in a step's batch with this probability."""
    return min(1.0, batch_size / max(examples, 1))


def steps_per_call(epochs: int, batch_size: int, examples: int) -> int:
    """DP-SGD steps of one local training call: as many as the non-private loop takes (epochs x batches)."""
    return epochs * math.ceil(examples / batch_size)


def planned_steps(config: RunConfig, examples: int, calls_per_round: int = 1) -> int:
    """The steps a client is calibrated for: a local training call (or ``calls_per_round``) in every round of the
    run (with client sampling a client trains fewer rounds, so this over-plans and the run spends less)."""
    return config.global_rounds * calls_per_round * steps_per_call(config.local_epochs, config.batch_size, examples)


def events(rate: float, steps: int, releases: int = 0) -> list[Release]:
    """A client's charged events: its DP-SGD steps, and ``releases`` Gaussian mechanisms of the same noise
    multiplier on all its data at once (no sampling: FedLEASE's data signature)."""
    return sgd_steps(rate, steps) + [Release("signature", 0, 1.0)] * releases


@functools.cache
def calibrated_noise(target: float, delta: float, rate: float, steps: int, releases: int = 0) -> float:
    """The smallest noise multiplier whose ``steps`` Poisson-sampled steps at ``rate`` (and ``releases``
    unsampled Gaussian releases) spend ``target``."""
    return calibrate(target, delta, events(rate, steps, releases))


@functools.cache
def spent(noise: float, rate: float, steps: int, delta: float, releases: int = 0) -> float:
    """The epsilon of ``steps`` DP-SGD steps of noise multiplier ``noise`` at Poisson rate ``rate`` (and of
    ``releases`` unsampled Gaussian releases at that noise multiplier)."""
    return epsilon(noise, events(rate, steps, releases), delta)


@dataclass
class DPSGD:
    """One client's DP-SGD, for the local training calls of one round (``LocalClient.fit`` reads it)."""

    noise: float  # the noise multiplier
    clip: float  # each example's gradient is clipped to this L2 norm
    rate: float  # the Poisson rate q
    secret: int  # the client's own seed: its batches and its noise
    steps: int = 0  # steps taken so far, over the whole run (this round's included once taken)
    round_steps: int = 0  # steps taken in this round
    releases: int = 0  # releases outside DP-SGD so far (FedLEASE's data signature, once)
    round_releases: int = 0

    def batches(self) -> torch.Generator:
        """The generator of the next call's Poisson batches (its first step is step ``steps``)."""
        return torch.Generator().manual_seed(derive_seed(self.secret, "dp-sgd-batches", self.steps))

    def batch(self, examples: int, generator: torch.Generator) -> torch.Tensor:
        """A Poisson sample of ``range(examples)``: each row independently with probability q (may be empty)."""
        return torch.nonzero(torch.rand(examples, generator=generator) < self.rate).flatten()

    def optimizer(self, optimizer: torch.optim.Optimizer, expected_batch_size: int, device: torch.device
                  ) -> DPOptimizer:
        """``optimizer`` wrapped in Opacus' DPOptimizer: per-example clipping, noise, division by the expected
        batch size (the mean loss of a Poisson batch, whose size varies)."""
        noise = torch.Generator(device=device).manual_seed(derive_seed(self.secret, "dp-sgd-noise", self.steps))
        return DPOptimizer(optimizer, noise_multiplier=self.noise, max_grad_norm=self.clip,
                           expected_batch_size=expected_batch_size, loss_reduction="mean", generator=noise)

    def took(self, steps: int) -> None:
        self.steps += steps
        self.round_steps += steps

    def released(self) -> None:
        """Charge one Gaussian release of sensitivity-scaled noise ``noise`` on all the client's data."""
        self.releases += 1
        self.round_releases += 1

    def report(self, delta: float) -> dict[str, float]:
        """What the client reports with its update: its noise, rate, steps and the epsilon spent so far."""
        return {"dp_noise": self.noise, "dp_sample_rate": self.rate, "dp_steps": float(self.steps),
                "dp_round_steps": float(self.round_steps), "dp_releases": float(self.releases),
                "dp_round_releases": float(self.round_releases),
                EPSILON_METRIC: spent(self.noise, self.rate, self.steps, delta, self.releases)}


def session(config: RunConfig, store: dict[str, torch.Tensor], examples: int, secret: int,
            calls_per_round: int = 1, planned_releases: int = 0) -> DPSGD:
    """The client's DP-SGD for this round, from its store: the noise multiplier fixed before its first training
    (``--dp_noise``, or calibrated for ``planned_steps`` and ``planned_releases`` to spend ``--dp_epsilon``) and
    its steps and releases so far."""
    rate = sample_rate(config.batch_size, examples)
    if NOISE in store:
        noise = float(store[NOISE])
    elif config.dp_noise is not None:
        noise = float(config.dp_noise)
    else:
        noise = calibrated_noise(config.dp_epsilon, run_delta(config), rate,
                                 planned_steps(config, examples, calls_per_round), planned_releases)
    store[NOISE] = torch.tensor(noise, dtype=torch.float64)
    return DPSGD(noise, float(config.dp_clip), rate, secret, int(store.get(STEPS, torch.tensor(0))),
                 releases=int(store.get(RELEASES, torch.tensor(0))))


def save(dp: DPSGD, store: dict[str, torch.Tensor]) -> None:
    store[STEPS] = torch.tensor(dp.steps, dtype=torch.int64)
    store[RELEASES] = torch.tensor(dp.releases, dtype=torch.int64)


def per_sample_gradients(loss_of: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor,
                         params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Each example's own gradient, by micro-batching (the exact reference of ``per_example``): for every row of
    ``index``, ``loss_of`` (the mean loss of the rows it is given) of that row alone, differentiated. Sets
    ``p.grad_sample`` (rows, *p.shape) on each of ``params`` for Opacus' DPOptimizer (a parameter the row does not
    reach gets zeros) and returns the rows' losses. Exact whatever the layers (dropout, routing, pairs, a decoder);
    costs a pass per example."""
    samples = [torch.zeros((len(index), *p.shape), dtype=p.dtype, device=p.device) for p in params]
    losses = torch.zeros(len(index), device=params[0].device if params else None)
    for row in range(len(index)):
        loss = loss_of(index[row:row + 1])
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for sample, grad in zip(samples, grads, strict=True):
            if grad is not None:
                sample[row] = grad
        losses[row] = loss.detach().float()
    for param, sample in zip(params, samples, strict=True):
        param.grad_sample = sample
    return losses


def release(params: Sequence[torch.nn.Parameter]) -> None:
    """Drop what DP-SGD left on ``params`` (Opacus' per-sample and summed gradients)."""
    for param in params:
        for name in ("grad_sample", "summed_grad"):
            if hasattr(param, name):
                delattr(param, name)


class RecordLedger:
    """The server's record of a record-level run: each client's noise multiplier, rate and steps as the client
    reported them (public numbers), charged by dp-accounting. The steps are summed from every update that
    arrived, accepted or not; and where a client's running count says it took steps in rounds whose update never
    arrived here (a reply past the round's timeout: it left the client all the same, and the client's count is
    never rolled back, see ``runtime.client_state``), those are charged too, once its next update arrives."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.delta = run_delta(config)
        self.clients: dict[int, dict[str, float]] = {}  # client -> noise_multiplier, sample_rate, steps

    def observe(self, updates: Mapping[int, Any]) -> None:
        """Charge the DP-SGD steps of this round's updates (``Update`` objects, by client)."""
        for cid, update in sorted(updates.items()):
            metrics = update.metrics
            if "dp_round_steps" not in metrics:
                continue
            entry = self.clients.setdefault(int(cid), {"noise_multiplier": metrics["dp_noise"],
                                                       "sample_rate": metrics["dp_sample_rate"], "steps": 0,
                                                       "signature_releases": 0})
            entry["noise_multiplier"], entry["sample_rate"] = metrics["dp_noise"], metrics["dp_sample_rate"]
            for total, running, this_round in (("steps", "dp_steps", "dp_round_steps"),
                                               ("signature_releases", "dp_releases", "dp_round_releases")):
                counted = f"reported_{total}"  # the client's running count as its last update here said it
                before = int(metrics.get(running, 0) - metrics.get(this_round, 0))
                unseen = max(0, before - int(entry.get(counted, entry[total])))  # rounds whose update never came
                entry[total] = int(entry[total] + unseen + metrics.get(this_round, 0))
                entry[counted] = int(metrics.get(running, 0))

    def epsilon_of(self, cid: int) -> float:
        entry = self.clients[cid]
        return spent(entry["noise_multiplier"], entry["sample_rate"], int(entry["steps"]), self.delta,
                     int(entry["signature_releases"]))

    def largest(self) -> float:
        """The largest epsilon any client has spent (0 before any training)."""
        return max((self.epsilon_of(cid) for cid in self.clients), default=0.0)

    def record(self) -> dict[str, Any]:
        """What training_history.json keeps under ``privacy``."""
        clients = {str(cid): {**{k: v for k, v in entry.items() if not k.startswith("reported_")},
                              "steps": int(entry["steps"]),
                              "signature_releases": int(entry["signature_releases"]), "epsilon": self.epsilon_of(cid)}
                   for cid, entry in sorted(self.clients.items())}
        return {"unit": "record", "epsilon": self.largest(), "delta": self.delta, "clip": self.config.dp_clip,
                "accountant": RECORD_ACCOUNTANT, "target_epsilon": self.config.dp_epsilon,
                "noise_multiplier": self.config.dp_noise, "clients": clients}

    def state_dict(self) -> dict[str, Any]:
        return {"clients": {str(cid): dict(entry) for cid, entry in self.clients.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clients = {int(cid): dict(entry) for cid, entry in state["clients"].items()}
