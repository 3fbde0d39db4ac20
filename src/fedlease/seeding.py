"""Seeds derived from the run seed and a purpose, identical in every process.

Every random choice (partition, initialisation, a client's shuffling and dropout in a round) draws from its own
seed, derived from the run seed and names. Results then do not depend on the order clients are trained in,
on which process trains them (in-process runner or Flower), on PYTHONHASHSEED, or on a resume.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed fixed by ``seed`` and the ``purpose`` parts."""
    text = "\x1f".join([str(seed), *map(str, purpose)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def generator(seed: int, *purpose: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *purpose))
