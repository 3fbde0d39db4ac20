"""Who takes part in a round: the sampler both runtimes share.

A closed federation (the paper) trains every client every round. An open one samples: ``--clients_per_round N``
draws N clients uniformly without replacement each round, ``--sample_rate q`` lets each client take part
independently with probability q (Poisson sampling, the scheme that differential-privacy accounting assumes).
Every draw is seeded by the run seed and the round (``fedlease.seeding``), so every method of a comparison sees
the same cohorts, and a resumed run draws what the uninterrupted one would have.

``--unseen_clients M`` holds M clients out of training altogether, spread over the tasks as evenly as the counts
allow (the tasks that get one more are drawn, as are the clients within a task): they are evaluated after the
last round with what their method gives a newcomer. Methods never sample: they receive the cohort and must only
be correct when a client is absent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlease.config import RunConfig
from fedlease.errors import ConfigError
from fedlease.seeding import generator


def unseen_clients(config: RunConfig) -> list[int]:
    """The clients held out of training (sorted), the same for every method of a seed."""
    if not config.unseen_clients:
        return []
    by_task: dict[str, list[int]] = {}
    for cid, task in enumerate(config.tasks):
        by_task.setdefault(task, []).append(cid)
    tasks = list(by_task)
    order = torch.randperm(len(tasks), generator=generator(config.seed, "unseen-tasks")).tolist()
    share = {tasks[i]: config.unseen_clients // len(tasks) + (rank < config.unseen_clients % len(tasks))
             for rank, i in enumerate(order)}
    chosen = []
    for task, members in by_task.items():
        if share[task] >= len(members):
            raise ConfigError(f"--unseen_clients {config.unseen_clients} holds out {share[task]} of the "
                              f"{len(members)} {task} client(s), leaving that task no client that trains")
        picks = torch.randperm(len(members), generator=generator(config.seed, "unseen", task))[: share[task]]
        chosen.extend(members[i] for i in picks.tolist())
    return sorted(chosen)


def check_participation(config: RunConfig) -> None:
    """Refuse sampling settings the clients cannot meet (one line each; called before anything is written)."""
    trainable = config.num_clients - len(unseen_clients(config))
    if config.clients_per_round > trainable:
        held = f" ({config.unseen_clients} held out by --unseen_clients)" if config.unseen_clients else ""
        raise ConfigError(f"--clients_per_round {config.clients_per_round} is more than the {trainable} clients "
                          f"that can train{held}")


class Participation:
    """The cohort of each round, drawn from the clients that can take part."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.unseen = unseen_clients(config)

    @property
    def partial(self) -> bool:
        """Whether rounds sample clients (otherwise every trainable client trains every round)."""
        return bool(self.config.clients_per_round) or self.config.sample_rate is not None

    def trainable(self) -> list[int]:
        held = set(self.unseen)
        return [cid for cid in range(self.config.num_clients) if cid not in held]

    def cohort(self, rnd: int, available: Sequence[int] | None = None, secret: int | None = None) -> list[int]:
        """The clients that train in round ``rnd`` (0-based), sorted. ``available``: those that can be reached
        now (a Flower run's connected nodes); default every trainable client. A uniform sample asks for more
        clients than are reachable gets all of them. The draw comes from the public ``--seed``, or from
        ``secret`` (client-level DP: the server's own, so that who was sampled is not known to whoever knows the
        run's settings, as amplification by sampling assumes)."""
        held = set(self.unseen)
        pool = sorted(cid for cid in (self.trainable() if available is None else available) if cid not in held)
        config = self.config
        draw = generator(config.seed if secret is None else secret, "cohort", rnd)
        if config.sample_rate is not None:
            draws = torch.rand(len(pool), generator=draw)
            return [cid for cid, u in zip(pool, draws.tolist(), strict=True) if u < config.sample_rate]
        if not config.clients_per_round or config.clients_per_round >= len(pool):
            return pool
        picks = torch.randperm(len(pool), generator=draw)[: config.clients_per_round]
        return sorted(pool[i] for i in picks.tolist())

    def evaluated(self, rnd: int, cohort: Sequence[int]) -> list[int]:
        """The trainable clients evaluated after round ``rnd``: the cohort, and every one after the last round and
        every ``--eval_every`` rounds (in a closed federation the cohort is every client)."""
        config = self.config
        every = config.eval_every and (rnd + 1) % config.eval_every == 0
        if rnd == config.global_rounds - 1 or every:
            return self.trainable()
        return sorted(cohort)
