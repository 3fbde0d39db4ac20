"""Check every client update before the server aggregates it.

An update is accepted only if it carries exactly the expected keys, each with the expected shape and dtype,
only finite values, a positive example count, and (with ``--max_update_norm`` and ``--update_norm_action
reject``) a change within the bound: the L2 norm of the upload minus what the client started the round from,
which the client measures and reports (``change_norm``), since only the client holds all of that starting point
(a Flower server loads no model, so it lacks the seeded initial values of what it did not send). The bound
catches a client whose training ran away, not one that lies about its norm. A rejected update is logged with the
client and the reason and left out of the round, exactly like a client that did not reply; the run goes on.

What is expected is learnt, not configured (the server never loads the model): the first time a key is
uploaded its shape and dtype are fixed by the majority of that round's uploads that carry it, and the keys an
update must carry are those the majority of uploads of that round carry for the same requested parts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import torch

from fedlease.methods.base import CHANGE_NORM, Instruction, Update

Signature = tuple[tuple[int, ...], str]


def signature(tensor: torch.Tensor) -> Signature:
    return tuple(tensor.shape), str(tensor.dtype)


class UpdateValidator:
    """``max_norm``: the bound on the change norm each update reports (None: not checked)."""

    def __init__(self, max_norm: float | None = None) -> None:
        self.max_norm = max_norm
        self.schema: dict[str, Signature] = {}

    def state_dict(self) -> dict[str, list]:
        return {key: [list(shape), dtype] for key, (shape, dtype) in self.schema.items()}

    def load_state_dict(self, values: Mapping[str, list]) -> None:
        self.schema = {key: (tuple(shape), dtype) for key, (shape, dtype) in values.items()}

    def filter(self, instructions: Mapping[int, Instruction], updates: Mapping[int, Update]
               ) -> tuple[dict[int, Update], dict[int, str]]:
        """Split ``updates`` into the accepted ones and, for the rest, the reason."""
        self.learn(updates)
        expected: dict[tuple[str, ...], set[str]] = {}
        by_parts: dict[tuple[str, ...], list[Update]] = {}
        for cid, update in updates.items():
            by_parts.setdefault(instructions[cid].upload, []).append(update)
        for parts, group in by_parts.items():
            counts = Counter(key for update in group for key in update.state)
            expected[parts] = {key for key, n in counts.items() if 2 * n > len(group)}
        accepted, rejected = {}, {}
        for cid, update in updates.items():
            reason = self.check(update, expected[instructions[cid].upload])
            if reason is None:
                accepted[cid] = update
            else:
                rejected[cid] = reason
        return accepted, rejected

    def learn(self, updates: Mapping[int, Update]) -> None:
        seen: dict[str, Counter] = {}
        for update in updates.values():
            for key, tensor in update.state.items():
                if key not in self.schema and isinstance(tensor, torch.Tensor):
                    seen.setdefault(key, Counter())[signature(tensor)] += 1
        for key, counts in seen.items():
            self.schema[key] = counts.most_common(1)[0][0]

    def check(self, update: Update, expected_keys: set[str]) -> str | None:
        if not (isinstance(update.num_examples, int) and update.num_examples > 0):
            return f"example count {update.num_examples!r} is not a positive integer"
        keys = set(update.state)
        if missing := sorted(expected_keys - keys):
            return f"missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        if extra := sorted(keys - expected_keys):
            return f"unexpected key {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
        for key in sorted(keys):
            tensor = update.state[key]
            if not isinstance(tensor, torch.Tensor):
                return f"{key} is not a tensor"
            if signature(tensor) != self.schema[key]:
                shape, dtype = self.schema[key]
                return f"{key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, expected {shape} {dtype}"
            if not torch.isfinite(tensor).all():
                return f"{key} holds non-finite values"
        if self.max_norm is not None:
            norm = update.metrics.get(CHANGE_NORM)
            if not isinstance(norm, int | float) or not math.isfinite(norm):
                return f"no measured change norm (--max_update_norm {self.max_norm:g}), got {norm!r}"
            if norm > self.max_norm:
                return f"change norm {norm:.4g} exceeds --max_update_norm {self.max_norm:g}"
        return None
