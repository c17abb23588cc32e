"""Per-sample clipping in one backward pass (book-keeping), with Opacus' own per-layer maths.

Opacus' ghost clipping runs two backward passes: the first computes every sample's gradient norm, the
second the clipped sum, as the gradient of the per-sample losses weighted by the clipping coefficients.
Book-keeping (Bu et al., "Differentially private optimization on large model at small cost", ICML 2023;
their open implementation is fastDP) keeps what the first pass already has, each trainable layer's
input (activations) and the gradient of the summed per-sample losses at its output (backprops), and
computes the clipped sum from them directly: the second backward pass is gone.

What is Opacus' and what is ours:
- per-sample gradient norms: Opacus' registered norm samplers (`NORM_SAMPLERS`: ||a_i|| ||g_i|| for a
  linear layer, embeddings), else, as Opacus' ghost clipping does too, the norms of the per-sample
  gradients its grad sampler gives (layer norms: small); and its clipping coefficient
  min(1, C / (norm + 1e-6));
- the clipped sum: for a linear layer the weight's gradient is bilinear in (backprops, activations), so
  sum_i c_i grad_i = (c * G)^T A, one matrix product, no per-sample tensor; for every other layer Opacus'
  registered grad sampler on the coefficient-scaled backprops, summed over the batch (per-sample
  gradients are linear in the backprops);
- the noise, its scale, the averaging and the accountant: Opacus' `DPOptimizerFastGradientClipping`,
  exactly as with ghost clipping (it expects `p.grad` to hold the clipped sum).
A model with a trainable layer that Opacus has no grad sampler for, or that calls a layer twice in one
forward pass, is refused here (`supports`);
the engine then uses Opacus' ghost clipping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

_COEFFICIENT_EPS = 1e-6
"""Opacus' `get_clipping_coef`: max_norm / (norm + 1e-6), capped at 1."""


def _trainable_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def supports(module: nn.Module, sample: torch.Tensor | None = None) -> bool:
    """Whether book-keeping applies to `module`: every trainable layer has an Opacus grad sampler and, run on
    `sample` (a few input rows), none is called more than once in a forward pass (a layer used twice has a
    per-sample gradient summed over its calls, whose norm the per-call figures do not give)."""
    layers = _trainable_layers(module)
    if not layers or any(type(m) not in GradSampleModule.GRAD_SAMPLERS for m in layers):
        return False
    if sample is None:
        return True
    calls: dict[nn.Module, int] = {}
    handles = [m.register_forward_hook(lambda m, _i, _o: calls.__setitem__(m, calls.get(m, 0) + 1)) for m in layers]
    training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(sample)
    finally:
        module.train(training)
        for handle in handles:
            handle.remove()
    return all(n == 1 for n in calls.values())


def _squared_norms(layer: nn.Module, activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """The squared norm of each sample's gradient of all the layer's parameters. A linear layer on one
    vector per sample: ||g_i||^2 (||a_i||^2 + 1 with a bias), the identity Opacus' linear norm sampler uses,
    written with two row sums (its einsums cost more than the layer's own product on small layers)."""
    if type(layer) is nn.Linear and backprops.dim() == 2 and layer.weight.requires_grad and (
            layer.bias is None or layer.bias.requires_grad):
        a = activations.to(backprops.dtype)
        return (backprops * backprops).sum(1) * ((a * a).sum(1) + (0.0 if layer.bias is None else 1.0))
    return sum((n.to(backprops.dtype) ** 2 for n in _norms(layer, activations, backprops)),
               torch.zeros(len(backprops), device=backprops.device, dtype=backprops.dtype))


def _norms(layer: nn.Module, activations: torch.Tensor, backprops: torch.Tensor) -> list[torch.Tensor]:
    """Each of the layer's parameters' per-sample gradient norms (Opacus' norm sampler, else its grad sampler)."""
    norm_sampler = GradSampleModuleFastGradientClipping.NORM_SAMPLERS.get(type(layer))
    if norm_sampler is not None:
        return list(norm_sampler(layer, [activations], backprops).values())
    grads = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [activations], backprops).values()
    return [g.reshape(len(g), -1).norm(2, dim=1) for g in grads]


class BookKeeping:
    """Clipped per-sample gradient sums of `module` in one backward pass (see the module docstring)."""

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        if not supports(module):
            raise ValueError("book-keeping needs an Opacus grad sampler for every trainable layer")
        self.module, self.max_grad_norm = module, max_grad_norm
        self.layers = _trainable_layers(module)
        self._seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            layer.register_forward_hook(self._keep)

    def _keep(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and self.module.training:
            self._seen[layer] = (inputs[0].detach(), output)

    def clipped_sum(self, losses: torch.Tensor) -> None:
        """Set each parameter's `.grad` to the sum over the batch of its per-sample gradients of `losses`
        (one loss per sample, from the forward pass just run), each sample's whole gradient clipped to
        `max_grad_norm` first."""
        layers = [m for m in self.layers if m in self._seen]
        seen = [self._seen[m] for m in layers]
        self._seen.clear()
        backprops = torch.autograd.grad(losses.sum(), [out for _, out in seen])
        squared = torch.zeros(len(losses), device=losses.device, dtype=losses.dtype)
        for layer, (activations, _), g in zip(layers, seen, backprops, strict=True):
            squared += _squared_norms(layer, activations, g).to(squared.dtype)
        coefficient = (self.max_grad_norm / (squared.sqrt() + _COEFFICIENT_EPS)).clamp(max=1.0)
        for layer, (activations, _), g in zip(layers, seen, backprops, strict=True):
            scaled = g * coefficient.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
            for param, grad in self._sums(layer, activations, scaled).items():
                param.grad = grad.to(param.dtype)

    @staticmethod
    def _sums(layer: nn.Module, activations: torch.Tensor, scaled: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
        """sum_i of the per-sample gradients at backprops `scaled` (already times each sample's coefficient)."""
        if type(layer) is nn.Linear:
            a = activations.to(scaled.dtype)
            sums: dict[torch.Tensor, torch.Tensor] = {}
            flat_g, flat_a = scaled.reshape(-1, scaled.shape[-1]), a.reshape(-1, a.shape[-1])
            if layer.weight.requires_grad:
                sums[layer.weight] = flat_g.t().mm(flat_a)
            if layer.bias is not None and layer.bias.requires_grad:
                sums[layer.bias] = flat_g.sum(0)
            return sums
        sampler: Callable[..., dict[torch.Tensor, torch.Tensor]] = GradSampleModule.GRAD_SAMPLERS[type(layer)]
        return {p: g.sum(0) for p, g in sampler(layer, [activations], scaled).items()}


class BookKeepingOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for clipped sums (noise, scale, averaging, accountant hooks: all Opacus'), taking the
    sum `clipped_sum` just made as its own instead of deep-copying it (a copy per parameter per step, about 5%
    of a small model's step): that tensor is new each step and nothing else keeps it."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad.data
            else:
                p.summed_grad.add_(p.grad.data)
