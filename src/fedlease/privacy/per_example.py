"""Every example's own gradient in one batched pass, for DP-SGD (``--dp_unit record``).

Opacus' hooks (``GradSampleHooks``) record each trainable layer's input in the forward pass and its output's
gradient in the backward pass of the batch's *summed* per-example losses, and a layer's grad sampler turns the
two into one gradient per example: ``nn.Linear`` (a classification head) has Opacus' own; the expert layer
(``ExpertLinear``) has the one registered here, since Opacus' generic functorch fallback refuses a layer that
holds buffers (the other experts' bank). Per example i, with h = dropout(x) (the layer keeps the h of each
forward while ``dp_inputs`` is a list: dropout's mask cannot be drawn again), g = dL/dy, the own expert's
columns o of the rank-(M*r) pair (EA, EB) and c the routing weights over its columns (the constant alpha / r
without a router):

    dL/dB_i = sum_t g_t (c * (EA h_t))_o^T        dL/dA_i = sum_t ((EB^T g_t) * c)_o h_t^T
    dL/dG_i = sum_t dlogits_t x_t^T,  dlogits_t = the router's backward of (EB^T g_t) * (EA h_t)

(the router's backward, through top-k and the softmax, is autograd's on the routing recomputed from the logits
the forward kept: each token's is its own, and its experts are those the forward chose, under autocast too). A
separately encoded pair is two rows of every encoder layer's input, first texts then second texts; its gradient
is their sum (``gradients``). Tests check all of it against ``record.per_sample_gradients``, which
differentiates one example at a time and is exact for any layer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from opacus.grad_sample import GradSampleHooks, register_grad_sampler

from fedlease.errors import FedleaseError
from fedlease.model.experts import ExpertLinear, route


@register_grad_sampler(ExpertLinear)
def expert_grad_sample(layer: ExpertLinear, activations: list[torch.Tensor], backprops: torch.Tensor
                       ) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-example gradients of the layer's trainable ``lora_A``, ``lora_B`` and ``router`` (see the module)."""
    x = activations[0]
    rows = x.shape[0]
    x = x.reshape(rows, -1, x.shape[-1]).float()
    h, logits = layer.dp_inputs.pop()  # this forward's dropout(x) and router logits
    h = h.reshape(rows, -1, x.shape[-1]).float()
    g = backprops.reshape(rows, -1, backprops.shape[-1]).float()
    wanted = {name: p for name, p in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("router", layer.router))
              if p is not None and p.requires_grad}
    layout = layer.layout
    with torch.no_grad():
        if layout.routing == "none":
            experts_A, experts_B = layer.lora_A.float(), layer.lora_B.float()
            columns = torch.tensor(layer.scaling, device=x.device)
            own = slice(0, layer.rank)
        else:
            experts_A, experts_B = (t.detach().float() for t in layer.spliced_bank())
            own = slice(layout.own_expert * layer.rank, (layout.own_expert + 1) * layer.rank)
            if layer.router is None:  # "fixed": the mixture (M,) or per example (rows, 1, M)
                columns = layer.mixture.float() @ layer.assign.float()
            else:
                logits = logits.reshape(rows, -1, logits.shape[-1]).float()  # the forward's choice of experts
                columns = route(logits, layout, layer.assign).float()
        z = h @ experts_A.t()  # (rows, tokens, M*r)
        back = g @ experts_B  # dL/d(z * columns)
        out = {}
        if "lora_B" in wanted:
            out[layer.lora_B] = torch.einsum("btd,btk->bdk", g, (z * columns)[..., own])
        if "lora_A" in wanted:
            out[layer.lora_A] = torch.einsum("btk,bti->bki", (back * columns)[..., own], h)
    if "router" in wanted:
        with torch.enable_grad():
            logits = logits.detach().requires_grad_(True)
            (dlogits,) = torch.autograd.grad(route(logits, layout, layer.assign), logits, back * z)
        out[layer.router] = torch.einsum("bts,bti->bsi", dlogits, x)
    return {param: grad.to(param.dtype) for param, grad in out.items()}


SPREAD = 1.5  # a pass's rows are within this factor of its longest one's tokens


def length_parts(index: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``index`` longest first, cut where a row is shorter than its part's longest / ``SPREAD``. An
    example's gradient does not depend on the rows it shares a pass with, so a Poisson batch (rows of any length)
    is computed as parts of similar lengths, padded little, as the length-grouped batches of training without
    DP are; at most about log(longest / shortest) / log(SPREAD) passes."""
    if not len(index):
        return []
    order = index[torch.argsort(lengths[index], descending=True, stable=True)]
    tokens = lengths[order].tolist()
    parts, start = [], 0
    for row in range(1, len(order)):
        if tokens[row] * SPREAD < tokens[start]:
            parts.append(order[start:row])
            start = row
    parts.append(order[start:])
    return parts


@contextlib.contextmanager
def hooks(model: torch.nn.Module) -> Iterator[None]:
    """Opacus' per-example hooks on ``model``'s trainable layers (those trainable when entered), for the
    summed per-example losses; the expert layers keep their dropped-out inputs meanwhile. On the way out, also
    after an error (a layer Opacus refuses, a failed step), the model is left as it was: no hook, no kept input,
    no per-example or accumulated gradient."""
    experts = [m for m in model.modules() if isinstance(m, ExpertLinear)]
    attached = None
    try:
        for layer in experts:
            layer.dp_inputs = []
        attached = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
        with warnings.catch_warnings():  # the first adapted layer's input (frozen embeddings) needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            yield
    finally:
        if attached is not None:
            attached.remove_hooks()
        else:  # Opacus stopped while attaching (a trainable layer it cannot handle): the hooks it had added
            for handle in getattr(model, "autograd_grad_sample_hooks", ()):
                handle.remove()
            if hasattr(model, "autograd_grad_sample_hooks"):
                delattr(model, "autograd_grad_sample_hooks")
        for layer in experts:
            layer.dp_inputs = None
        for param in model.parameters():
            param.grad = None
            for name in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(param, name):
                    delattr(param, name)
        for module in model.modules():
            for name in ("activations", "max_batch_len", "ft_compute_sample_grad"):
                if hasattr(module, name):
                    delattr(module, name)


def gradients(losses_of: Callable[[torch.Tensor], torch.Tensor], parts: Sequence[torch.Tensor],
              params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Within ``hooks``: each example's own gradient, for the rows of ``parts`` (one batch split to bound its
    padded tokens), as ``record.per_sample_gradients`` gives them: sets ``p.grad_sample`` (rows, *p.shape) on
    each of ``params`` (zeros where a row does not reach it) and returns the rows' losses. ``losses_of(rows)``:
    each row's own loss, (len(rows),). A layer that saw k rows per example (a separately encoded pair's
    encoder: first texts, then second texts) gets the sum of an example's k rows."""
    rows = sum(len(part) for part in parts)
    samples = [torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    losses = torch.zeros(rows, device=params[0].device if params else None)
    for param in params:  # what the last batch left (Opacus would stack this batch's onto it)
        param.grad_sample = None
    start = 0
    for part in parts:
        n = len(part)
        part_losses = losses_of(part)
        part_losses.sum().backward()
        for param, sample in zip(params, samples, strict=True):
            grad = param.grad_sample
            if grad is None and param.grad is not None:  # trained, yet never clipped: refuse, not zero-fill
                raise FedleaseError(f"DP-SGD: a trainable parameter of shape {tuple(param.shape)} has a gradient "
                                    "but no per-example gradient (its layer was not trainable when the hooks "
                                    "were attached, or Opacus has no grad sampler for it)")
            if grad is not None:
                if grad.shape[0] != n:  # k rows per example, one block of n rows after another
                    assert grad.shape[0] % n == 0, (grad.shape, n)
                    grad = grad.reshape(grad.shape[0] // n, n, *grad.shape[1:]).sum(0)
                sample[start:start + n] = grad
            param.grad_sample, param.grad = None, None
        losses[start:start + n] = part_losses.detach().float()
        start += n
    for param, sample in zip(params, samples, strict=True):
        param.grad_sample = sample
    return losses
