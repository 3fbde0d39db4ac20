"""Client-level DP-FedAvg's two halves: the client clips its change, the server noises each aggregate's sum.

The *change* of an upload is what it adds to the *reference*, the public state the client started its local
training from: what it downloaded, and the seeded initial values (``initial_state``, the same in every process)
for the parts it did not download. A client clips the change of its whole upload, every array that leaves it, to
one L2 norm (flat clipping, as Flower's fixed-clipping DP). The server keeps each aggregate as the reference plus
the noised mean change (``NoisyMean``): the sum of the members' changes, plus Gaussian noise of standard deviation
``noise x clip``, divided by the *expected* number of contributors (a number fixed before the round, so that one
client's presence changes the sum by at most the clip and the divisor not at all), with equal weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from fedlease.errors import FedleaseError
from fedlease.seeding import derive_seed


def change_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                keys: Iterable[str]) -> float:
    """The L2 norm of ``state - reference`` over ``keys``, all of them together."""
    total = 0.0
    for key in keys:
        total += float((state[key].double() - reference[key].double()).pow(2).sum())
    return math.sqrt(total)


def clip_change(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip: float
                ) -> tuple[dict[str, torch.Tensor], float]:
    """``state`` with its change against ``reference`` (over the keys both hold) scaled to an L2 norm of at most
    ``clip``; the keys the reference lacks are left as they are. Returns the clipped state and the norm before."""
    keys = [key for key in state if key in reference]
    norm = change_norm(state, reference, keys)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = dict(state)
    if scale < 1.0:
        for key in keys:
            change = state[key].double() - reference[key].double()
            clipped[key] = (reference[key].double() + scale * change).to(state[key].dtype)
    return clipped, norm


def gaussian_like(values: Mapping[str, torch.Tensor], std: float, seed: int) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) noise shaped as each of ``values`` (float64), drawn in key order from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(values[key].shape, generator=gen, dtype=torch.float64) * std for key in sorted(values)}


def add_noise(state: Mapping[str, torch.Tensor], keys: Iterable[str], std: float, seed: int
              ) -> dict[str, torch.Tensor]:
    """``state`` with N(0, std^2) noise added to ``keys`` (a client's own release: its noised warmup upload)."""
    keys = [key for key in keys if key in state]
    noise = gaussian_like({key: state[key] for key in keys}, std, seed)
    return {**state, **{key: (state[key].double() + noise[key]).to(state[key].dtype) for key in keys}}


def mismatched(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state`` differs from ``reference`` in its keys or shapes; None where they match."""
    if missing := sorted(set(reference) - set(state)):
        return f"the upload lacks {missing[0]}"
    if extra := sorted(set(state) - set(reference)):
        return f"the reference lacks {extra[0]}"
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            return f"{key} has shape {tuple(state[key].shape)}, the reference {tuple(ref.shape)}"
    return None


class NoisyMean:
    """The server's aggregate under DP: reference + (sum of changes + N(0, (noise x clip)^2)) / expected.

    ``secret`` seeds the noise: drawn once per run on the server (never derived from the public run seed, which
    would let anyone subtract the noise) and kept in its checkpoint, so a resumed run draws what an uninterrupted
    one would have."""

    def __init__(self, clip: float, noise: float, secret: int) -> None:
        self.clip, self.noise, self.secret = clip, noise, secret
        self.round = 0

    def mean(self, states: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
             expected: float, name: str) -> dict[str, torch.Tensor]:
        """The noised mean of ``states`` (the keys of ``reference``) for the aggregate called ``name`` in this
        round; ``expected``: how many contributors the round was expected to have (at least 1 is used)."""
        for state in states:  # each change is measured against the reference: they must hold the same arrays
            if (mismatch := mismatched(state, reference)) is not None:
                raise FedleaseError(f"differential privacy's aggregate {name!r}: an upload does not match the "
                                    f"reference its change is measured against ({mismatch}); where the reference "
                                    f"is the seeded initial state a node returned, do all nodes run the same "
                                    f"fedlease and model?")
        divisor = max(float(expected), 1.0)
        noise = gaussian_like(reference, self.noise * self.clip, derive_seed(self.secret, "dp", self.round, name))
        out = {}
        for key, ref in reference.items():
            total = sum((s[key].double() - ref.double() for s in states), torch.zeros(ref.shape, dtype=torch.float64))
            out[key] = (ref.double() + (total + noise[key]) / divisor).to(ref.dtype)
        return out
