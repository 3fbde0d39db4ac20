"""A mixture of LoRA experts with a per-token router, as a small PEFT-style tuner.

FedLEASE (Wang et al., NeurIPS 2025, arXiv 2509.15087), Sec. 3.3: an adapted linear layer holds the frozen
weight W0, M experts (A_k, B_k) and a router G: d_in -> 2M-1 slots. For a client whose own expert is g,

    w = softmax(G x);  slots 0..M-1 -> experts 0..M-1,  slots M..2M-2 -> expert g
    keep the top-M slots, renormalise them to sum 1, add up the weights of slots that map to one expert
    (the fixed top-k ablation keeps k slots; with k = 1 the slot keeps its raw probability, see ``route``)
    y = W0 x + (alpha / r) * sum_k w_k B_k A_k dropout(x)

Expert g owns M of the 2M-1 slots and only M-1 slots point elsewhere, so it is always selected, and the
number of distinct experts a token uses adapts between 1 and M.

Only the client's own expert is trained, so the layer keeps it as the parameters ``lora_A``/``lora_B`` and
the other experts as a frozen buffer bank; the forward splices the own expert into the bank. All M experts
run as one rank-(M*r) matmul pair with the routing weights applied between them, spread over each expert's r
columns (and scaled by alpha / r) by one product with a constant (slots, M*r) matrix: no Python loop over
experts or slots and no host sync. With M = 1 and no router the layer is exactly plain LoRA.

State moves as a flat mapping ``name -> tensor``: ``<site>.lora_A`` (r, d_in), ``<site>.lora_B`` (d_out, r),
``<site>.router`` (slots, d_in), ``<site>.experts_A`` (M, r, d_in), ``<site>.experts_B`` (M, d_out, r) and
``head.<param>`` for the classification head, where ``<site>`` is the adapted module's path in the model. A
download that carries a bank without ``lora_A``/``lora_B`` sends the own expert in its bank slot
(``own_expert_from_bank``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedlease.seeding import generator

ROUTINGS = ("none", "adaptive", "topk", "fixed")
PARTS = ("lora_A", "lora_B", "router", "experts", "head")


@dataclass(frozen=True)
class ExpertLayout:
    """How the expert layers of a client are arranged for one round.

    routing "none": M must be 1, plain LoRA. "adaptive": 2M-1 slots, top-M, own expert always selected (the
    paper). "topk": M slots, fixed top-k (the paper's ablation; no own-expert guarantee). "fixed": no router;
    the expert weights are set from outside per example (``AdaptedModel.set_mixture``; FedDPA).
    """

    num_experts: int = 1
    own_expert: int = 0
    routing: str = "none"
    top_k: int = 1

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.num_experts < 1 or not 0 <= self.own_expert < self.num_experts:
            raise ValueError(f"bad layout: {self}")
        if self.routing == "none" and self.num_experts != 1:
            raise ValueError("routing 'none' needs exactly one expert")
        if self.routing == "topk" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts}, got {self.top_k}")

    @property
    def num_slots(self) -> int:
        return {"none": 0, "adaptive": 2 * self.num_experts - 1, "topk": self.num_experts, "fixed": 0}[self.routing]

    @property
    def kept_slots(self) -> int:
        return self.num_experts if self.routing == "adaptive" else self.top_k

    def slot_to_expert(self) -> torch.Tensor:
        extra = [self.own_expert] * (self.num_slots - self.num_experts)
        return torch.tensor(list(range(self.num_experts)) + extra, dtype=torch.long)

    def to_config(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> ExpertLayout:
        return cls(**{key: config[key] for key in ("num_experts", "own_expert", "routing", "top_k")})


def route(router_logits: torch.Tensor, layout: ExpertLayout, assign: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token expert weights (..., M) from router logits (..., slots): top-k slots, renormalised, merged.

    ``assign`` (slots, X) maps a slot's weight onto X outputs; the default, one-hot rows of the slots' experts,
    gives (..., M). The expert layer passes each expert's weight repeated over its r rank columns and scaled by
    alpha / r, so that one product gives what multiplies its rank-(M*r) activations. Exactly k slots are kept
    (top-k's, ties broken as it breaks them); their renormalised probabilities are the softmax over them alone. A
    single kept slot keeps its raw probability, as in Switch Transformers (Fedus et al., 2022): renormalised it
    would always weigh 1, and the router would get no gradient."""
    logits = router_logits.float()
    if assign is None:
        assign = expert_columns(layout.num_experts, 1, 1.0, layout.slot_to_expert()).to(logits.device)
    kept = logits.topk(layout.kept_slots, dim=-1).indices
    if layout.kept_slots > 1:  # the kept slots' probabilities renormalised: a softmax over them alone
        weights = (logits + torch.full_like(logits, -math.inf).scatter(-1, kept, 0.0)).softmax(dim=-1)
    else:
        weights = logits.softmax(dim=-1) * torch.zeros_like(logits).scatter(-1, kept, 1.0)
    return weights @ assign.to(weights.dtype)


def expert_columns(experts: int, rank: int, scaling: float, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), experts * rank): row i holds ``scaling`` in the rank columns of expert ``rows[i]``."""
    return F.one_hot(rows, experts).float().repeat_interleave(rank, dim=1) * scaling


def flat_layout(bank_B: torch.Tensor) -> torch.Tensor:
    """A (M, d_out, r) bank of B matrices as one (d_out, M*r) matrix, expert by expert."""
    return bank_B.permute(1, 0, 2).reshape(bank_B.shape[1], -1)


def refill(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` written into ``buffer`` where the shapes agree, else ``value`` on ``buffer``'s device: ``assign`` and
    ``own_rows`` keep their memory from client to client, as a CUDA graph, which reads its inputs at recorded
    addresses, needs. A forward saves them for its backward (the routing's product, the splice's rows): configure
    a layer between a forward and its backward and the backward refuses the changed buffer, which nothing here
    does."""
    if buffer.shape != value.shape or buffer.dtype != value.dtype or buffer.is_inference():
        return value.to(buffer.device)
    return buffer.copy_(value)


class ExpertLinear(nn.Module):
    """A frozen ``nn.Linear`` plus LoRA experts and a router; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in, d_out = base.in_features, base.out_features
        # LoRA weights stay fp32 whatever the frozen base is stored in (bf16, or 8/4-bit integers): autocast
        # chooses the dtype of the products, and the optimiser updates full-precision weights.
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **factory))
        self.register_parameter("router", None)
        self.register_buffer("experts_A", torch.zeros(0, rank, d_in, **factory), persistent=False)
        self.register_buffer("experts_B", torch.zeros(0, d_out, rank, **factory), persistent=False)
        # the B bank in its (d_out, M*r) layout (spliced_bank)
        self._flat_B: torch.Tensor | None = None
        self._flat_B_of: tuple[torch.Tensor, int] | None = None  # the bank and version _flat_B was made from
        self.register_buffer("assign", torch.zeros(0, 0, device=factory["device"]), persistent=False)
        # the own expert's rows of the (M*r, d_in) bank as a tensor, for compiled graphs (spliced_bank)
        self.register_buffer("own_rows", torch.arange(rank, device=factory["device"]), persistent=False)
        # "fixed" routing: expert weights (M,) or per example (batch, 1, M), set by AdaptedModel.set_mixture
        self.register_buffer("mixture", torch.ones(1, device=factory["device"]), persistent=False)
        self.layout = ExpertLayout()
        # DP-SGD's per-example gradients (privacy/per_example.py): while a list, every training forward's
        # dropout(x), which the backward cannot draw again, and its router logits (None without a router)
        self.dp_inputs: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    @torch.inference_mode(False)
    def configure(self, layout: ExpertLayout) -> None:
        """Re-arrange for ``layout``; tensors are re-allocated only when their shape changes. What it makes is
        never an inference tensor: a layer configured while evaluating still trains."""
        device, dtype = self.lora_A.device, self.lora_A.dtype
        m, slots = layout.num_experts, layout.num_slots
        if layout.routing == "none":
            self.experts_A = self.experts_A.new_zeros(0, *self.lora_A.shape)
            self.experts_B = self.experts_B.new_zeros(0, *self.lora_B.shape)
            self.router = None
        else:
            if self.experts_A.shape[0] != m:
                self.experts_A = torch.zeros(m, *self.lora_A.shape, device=device, dtype=dtype)
                self.experts_B = torch.zeros(m, *self.lora_B.shape, device=device, dtype=dtype)
            if slots == 0:
                self.router = None
            elif self.router is None or self.router.shape[0] != slots:
                self.router = nn.Parameter(torch.zeros(slots, self.base.in_features, device=device, dtype=dtype))
        # what turns slot (or, for "fixed" routing, expert) weights into the rank columns' multipliers
        rows = layout.slot_to_expert() if slots else torch.arange(m)
        self.assign = refill(self.assign, expert_columns(m, self.rank, self.scaling, rows))
        self.mixture = torch.full((m,), 1.0 / m, device=device)
        self.own_rows = refill(self.own_rows, torch.arange(layout.own_expert * self.rank,
                                                           (layout.own_expert + 1) * self.rank))
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        h = self.dropout(x).to(self.lora_A.dtype)
        logits = None
        if self.layout.routing == "none":
            out = result + (h @ self.lora_A.t() @ self.lora_B.t() * self.scaling).to(result.dtype)
        else:
            experts_A, experts_B = self.spliced_bank()  # (M*r, d_in), (d_out, M*r)
            if self.router is None:  # "fixed": the mixture set from outside, (M,) or (batch, 1, M)
                columns = self.mixture.to(self.assign.dtype) @ self.assign
            else:
                logits = F.linear(x.to(self.router.dtype), self.router)
                columns = route(logits, self.layout, self.assign)
            z = h @ experts_A.t()  # every expert's A at once: (..., M*r)
            out = result + ((z * columns.to(z.dtype)) @ experts_B.t()).to(result.dtype)
        if self.dp_inputs is not None and self.training and torch.is_grad_enabled() and \
                any(p.requires_grad for p in self.parameters(recurse=False)):  # as Opacus records x
            # dropout's draw and the router's logits as this forward computed them (under autocast, in its dtype:
            # logits recomputed in fp32 could pick other experts than the forward did)
            self.dp_inputs.append((h.detach(), None if logits is None else logits.detach()))
        return out

    def spliced_bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts as one rank-(M*r) pair, (M*r, d_in) and (d_out, M*r), the own expert's rows and columns
        the trained ``lora_A``/``lora_B`` (one concatenation each, whose backward is a view). The B bank's
        (d_out, M*r) layout is a copy, made again only when the bank changes (a new tensor, or an in-place write,
        which bumps its version: ``load_state``'s copy, any in-place op; not a write through ``.data`` or a NumPy
        view, which nothing here makes): not in every step."""
        bank = self.experts_B
        if torch.compiler.is_compiling():  # a compiled graph makes the layout itself, at no launch of its own
            return self.splice(self.experts_A.flatten(0, 1), flat_layout(bank))
        # an inference tensor (made under torch.inference_mode) keeps no version: its layout is never reused
        version = None if bank.is_inference() else bank._version
        if version is None or self._flat_B_of is None or self._flat_B_of[0] is not bank or \
                self._flat_B_of[1] != version:
            with torch.inference_mode(version is None):  # one made while evaluating serves training later
                self._flat_B = flat_layout(bank)
            self._flat_B_of = None if version is None else (bank, version)
        return self.splice(self.experts_A.flatten(0, 1), self._flat_B)

    def splice(self, flat_A: torch.Tensor, flat_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The banks (M*r, d_in) and (d_out, M*r) with the own expert's rows and columns ``lora_A``/``lora_B``.
        Compiled, at the rows a tensor names: slicing at the own expert's Python offsets would make the graph
        specialise on them, so every own expert (every cluster of clients) would compile a graph of its own."""
        if torch.compiler.is_compiling():
            return flat_A.index_copy(0, self.own_rows, self.lora_A), flat_B.index_copy(1, self.own_rows, self.lora_B)
        start, end = self.layout.own_expert * self.rank, (self.layout.own_expert + 1) * self.rank
        return (torch.cat([flat_A[:start], self.lora_A, flat_A[end:]]),
                torch.cat([flat_B[:, :start], self.lora_B, flat_B[:, end:]], dim=1))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, layout={self.layout}"


def inject_experts(model: nn.Module, target_modules: Iterable[str], rank: int, alpha: float,
                   dropout: float) -> dict[str, ExpertLinear]:
    """Replace every ``nn.Linear`` whose last name is in ``target_modules``; return the new layers by path."""
    targets = set(target_modules)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    sites = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        layer = ExpertLinear(module, rank, alpha, dropout)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        sites[name] = layer
    return sites


def init_lora_state(sites: Mapping[str, ExpertLinear], seed: int) -> dict[str, torch.Tensor]:
    """The shared initial LoRA of every client: A Kaiming-uniform (as PEFT), B zero, one draw per site."""
    state = {}
    for name, layer in sites.items():
        a = torch.empty(layer.lora_A.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator(seed, "lora_A", name))
        state[f"{name}.lora_A"] = a
        state[f"{name}.lora_B"] = torch.zeros(layer.lora_B.shape)
    return state


def own_expert_from_bank(state: Mapping[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """``<site>.lora_A``/``.lora_B`` taken from the own slot of each bank in ``state`` that comes without them:
    a download carries the own expert once, in the bank (whose own slot the forward otherwise ignores)."""
    own = {}
    for key, bank in state.items():
        site, _, part = key.rpartition(".")
        if part in ("experts_A", "experts_B") and f"{site}.lora_{part[-1]}" not in state:
            own[f"{site}.lora_{part[-1]}"] = bank[layout.own_expert]
    return own


def init_router(d_in: int, slots: int, seed: int, site: str) -> torch.Tensor:
    """A router's initial weight, as ``nn.Linear`` draws it (what the released code uses), seeded per site."""
    weight = torch.empty(slots, d_in)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator(seed, "router", site))
    return weight


class AdaptedModel:
    """One frozen backbone with expert layers and a classification head.

    Clients differ only by the state they load: ``load_state`` copies tensors in place, ``configure`` changes
    the expert layout, and nothing is rebuilt between clients or rounds.
    """

    def __init__(self, model: nn.Module, sites: dict[str, ExpertLinear], head_names: list[str],
                 pretrained_head: Iterable[str] = ()) -> None:
        """``pretrained_head``: the head parameters the checkpoint already held at the right size; every client
        starts from their loaded values instead of a fresh draw."""
        self.model = model
        self.sites = sites
        params = dict(model.named_parameters())
        self.head = {name: params[name] for name in head_names}
        # copied now: clients' states are later loaded into these very tensors
        self.pretrained_head = {name: params[name].detach().to("cpu", copy=True) for name in pretrained_head}

    @property
    def layout(self) -> ExpertLayout:
        return next(iter(self.sites.values())).layout

    def configure(self, layout: ExpertLayout) -> None:
        for layer in self.sites.values():
            layer.configure(layout)

    def set_mixture(self, weights: torch.Tensor) -> None:
        """Expert weights for "fixed" routing: (M,) for every token, or (batch, M) per example."""
        device = next(iter(self.sites.values())).lora_A.device
        weights = weights.to(device)
        if weights.dim() == 2:
            weights = weights.unsqueeze(1)  # (batch, 1, M): the same weights for every token of an example
        for layer in self.sites.values():
            layer.mixture = weights
    def tensors(self, parts: Iterable[str]) -> dict[str, torch.Tensor]:
        """The live tensors of ``parts`` (a subset of PARTS) by state name."""
        parts = set(parts)
        unknown = parts - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}")
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.sites.items():
            if "lora_A" in parts:
                out[f"{name}.lora_A"] = layer.lora_A
            if "lora_B" in parts:
                out[f"{name}.lora_B"] = layer.lora_B
            if "router" in parts and layer.router is not None:
                out[f"{name}.router"] = layer.router
            if "experts" in parts and layer.layout.routing != "none":
                out[f"{name}.experts_A"] = layer.experts_A
                out[f"{name}.experts_B"] = layer.experts_B
        if "head" in parts:
            out.update({f"head.{name}": param for name, param in self.head.items()})
        return out

    def state(self, parts: Iterable[str]) -> dict[str, torch.Tensor]:
        """A detached CPU copy of ``parts``: what a client uploads or a checkpoint stores."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.tensors(parts).items()}

    @torch.no_grad()
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model; every key must exist in the current layout with the same shape."""
        live = self.tensors(PARTS)
        for name, value in state.items():
            if name not in live:
                raise KeyError(f"state key {name!r} does not exist in layout {self.layout}")
            if tuple(value.shape) != tuple(live[name].shape):
                raise ValueError(f"state {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(live[name].shape)}")
            live[name].copy_(value)

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        """LoRA A/B and head as every client starts: one draw from the seed, the same in every process; a head
        parameter the checkpoint held at the right size keeps its loaded value."""
        state = init_lora_state(self.sites, seed)
        for name, param in self.head.items():
            if name in self.pretrained_head:
                state[f"head.{name}"] = self.pretrained_head[name].clone()
            else:
                state[f"head.{name}"] = self.fresh_head_value(name, param.shape, seed)
        return state

    def fresh_head_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """A new head parameter as its module's own initialisation (Hugging Face's) makes it: a norm's weight 1,
        a matrix normal(0, initializer_range), every bias and other vector 0."""
        owner = self.model.get_submodule(name.rpartition(".")[0])
        if name.endswith(".weight") and "norm" in type(owner).__name__.lower():  # LayerNorm, RMSNorm, ...
            return torch.ones(shape)
        value = torch.zeros(shape)
        if len(shape) > 1:
            std = getattr(getattr(self.model, "config", None), "initializer_range", 0.02)
            value.normal_(0.0, std, generator=generator(seed, "head", name))
        return value

    def set_trainable(self, parts: Iterable[str]) -> list[nn.Parameter]:
        """Make exactly ``parts`` trainable (never the backbone or the frozen bank); return them."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        chosen = [t for t in self.tensors(set(parts) - {"experts"}).values() if isinstance(t, nn.Parameter)]
        for param in chosen:
            param.requires_grad_(True)
        return chosen
