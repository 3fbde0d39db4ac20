"""FedDPA: a global adapter (FedAvg) and a personal local adapter, mixed per test instance.

Yang, Long, Shen, Jiang, Blumenstein, "Dual-Personalizing Adapter for Federated Foundation Models",
NeurIPS 2024 (arXiv 2403.19211). We implement FedDPA-T, the variant the authors' release trains:

- round 0: every client trains the global adapter (and its head); the server averages it (FedAvg);
- later rounds, on each client: first the local adapter is trained with the downloaded global adapter frozen,
  the two mixed with weight 1/2 each (the release's ``local_weight`` 0.5; the local adapter starts as a copy
  of the global one); then the global adapter and the head are trained alone and uploaded. The local adapter
  never leaves the client.
- inference, instance-wise dynamic weighting: for a test instance x, alpha(x) = 0.5 * mean_i cos(e(x), e(x_i))
  over 5 randomly drawn local training instances x_i, where e is the mean-pooled last hidden state of the model
  with the local adapter; the output mixes the adapters as (1 - alpha(x)) * global + alpha(x) * local, so an
  instance that looks like the client's own data leans on the local adapter.

Heads are averaged among clients that share a label set, as for every method here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fedlease.methods.base import LORA_PARTS, Instruction, Update, select
from fedlease.methods.shared import SharedAdapterMethod
from fedlease.model.experts import ExpertLayout
from fedlease.seeding import derive_seed, generator
from fedlease.train import Encoded, LocalClient

PARTS = ("lora_A", "lora_B", "head")
LOCAL_PREFIX = "local/"  # the local adapter's keys in the client's store
MIXED = ExpertLayout(num_experts=2, own_expert=1, routing="fixed")  # expert 0: global, expert 1: local
LOCAL_TRAINING_MIX = torch.tensor([0.5, 0.5])
SIMILARITY_SCALE = 0.5
REFERENCE_INSTANCES = 5


class FedDPA(SharedAdapterMethod):
    """The server half is FedIT's (the global adapter is FedAvg'd); the client half below adds the local
    adapter and the instance-wise mixing."""

    name = "feddpa"
    local_calls = 2  # the local adapter, then the global one
    shared = LORA_PARTS
    trained = uploaded = PARTS

    # -- client half --------------------------------------------------------------------------------------
    @staticmethod
    def local_adapter(store: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key.removeprefix(LOCAL_PREFIX): value for key, value in store.items() if key.startswith(LOCAL_PREFIX)}

    def load_mixed(self, client: LocalClient, ins: Instruction, local: Mapping[str, torch.Tensor]) -> None:
        """Global adapter as frozen expert 0, local adapter as the trainable expert 1."""
        self.load(client, Instruction(ExpertLayout(), ins.state), {})
        global_ = client.state(LORA_PARTS)
        state = dict(local)
        for key, value in global_.items():
            site, _, part = key.rpartition(".")
            state[f"{site}.experts_{part[-1]}"] = torch.stack([value, local[key]])
        client.apply(MIXED, state)

    def client_train(self, client: LocalClient, ins: Instruction, rnd: int,
                     store: dict[str, torch.Tensor]) -> Update:
        seed = derive_seed(self.config.seed, "train", rnd, client.client_id)
        if ins.state:  # a global adapter exists: personalise first
            self.load(client, ins, store)
            local = self.local_adapter(store) or client.state(LORA_PARTS)
            self.load_mixed(client, ins, local)
            client.adapted.set_mixture(LOCAL_TRAINING_MIX)
            local_metrics = client.fit(LORA_PARTS, seed=derive_seed(seed, "local"))
            store.update({LOCAL_PREFIX + key: value for key, value in client.state(LORA_PARTS).items()})
        else:
            local_metrics = {}
        self.load(client, ins, store)
        metrics = client.fit(ins.train, seed=seed)
        if local_metrics:
            metrics = {**metrics, "local_train_loss": local_metrics["train_loss"],
                       "steps": metrics["steps"] + local_metrics["steps"],
                       "examples": metrics["examples"] + local_metrics["examples"],
                       "seconds": metrics["seconds"] + local_metrics["seconds"]}
        return Update(client.state(ins.upload), client.num_train, metrics)

    def instance_mixture(self, client: LocalClient, local: Mapping[str, torch.Tensor], data: Encoded
                         ) -> torch.Tensor:
        """(N, 2) expert weights for the rows of ``data``: alpha from their similarity to a few local training
        instances, under the local adapter (``local``: its LoRA and the head)."""
        self.load(client, Instruction(ExpertLayout(), dict(local)), {})
        gen = generator(self.config.seed, "feddpa-references", client.client_id)
        picks = torch.randperm(client.num_train, generator=gen)[:REFERENCE_INSTANCES]
        # inputs only: a test query's embedding must not read its reference answer (an instruction row's response)
        references = client.embed(client.train_data.subset(picks), inputs_only=True)
        queries = client.embed(data, inputs_only=True)
        similarity = F.cosine_similarity(queries.unsqueeze(1), references.unsqueeze(0), dim=-1).mean(1)
        alpha = SIMILARITY_SCALE * similarity
        return torch.stack([1 - alpha, alpha], dim=1)

    def client_evaluate(self, client: LocalClient, ins: Instruction, rnd: int,
                        store: dict[str, torch.Tensor]) -> dict[str, float]:
        local = self.local_adapter(store)
        if not local:
            self.load(client, ins, store)
            return client.evaluate()
        mixture = self.instance_mixture(client, {**select(ins.state, ("head",)), **local}, client.test_data)
        self.load_mixed(client, ins, local)
        return client.evaluate(mixture=mixture)

    # -- using the trained client -------------------------------------------------------------------------
    reads_train_data = True  # the instance-wise weights compare each input with local training instances

    def apply_final(self, client: LocalClient, layout: ExpertLayout, state: Mapping[str, torch.Tensor],
                    data: Encoded) -> torch.Tensor | None:
        if layout != MIXED:  # no local adapter yet: the global adapter alone, as evaluated
            return super().apply_final(client, layout, state, data)
        # the mixed model's own expert is the local adapter (load_mixed): the weights come from it, as evaluated
        mixture = self.instance_mixture(client, select(state, ("lora_A", "lora_B", "head")), data)
        client.apply(layout, state)
        return mixture
