"""Book-keeping clipping (executor/bookkeeping.py) gives Opacus' ghost clipping's clipped sums, in one backward."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from veil.executor import bookkeeping, dpsgd
from veil.models.spec import ModelSpec

MAX_NORM = 0.7


def _ghost_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus' ghost clipping's clipped per-sample gradient sums (noise 0, no step)."""
    wrapped = prepare_module(model, grad_sample_mode="ghost", batch_first=True, loss_reduction="mean",
                             max_grad_norm=MAX_NORM)
    optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")(
        torch.optim.SGD(wrapped.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=MAX_NORM,
        expected_batch_size=len(x), loss_reduction="mean")
    criterion = DPLossFastGradientClipping(wrapped, optimizer, nn.CrossEntropyLoss(), "mean")
    optimizer.zero_grad(set_to_none=True)
    criterion(wrapped(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _bk_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    keeper = bookkeeping.BookKeeping(model, MAX_NORM)
    model.train()
    keeper.clipped_sum(nn.CrossEntropyLoss(reduction="none")(model(x), y))
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("scale", [0.05, 5.0])  # gradients mostly under the bound, and all clipped
def test_clipped_sums_equal_opacus_ghost_clipping(scale: float) -> None:
    torch.manual_seed(3)
    x, y = torch.randn(64, 12) * scale, torch.randint(0, 3, (64,))
    make = lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))  # noqa: E731
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(0)
    b = make()
    ghost, bk = _ghost_sums(a, x, y), _bk_sums(b, x, y)
    assert ghost.keys() == bk.keys()
    for name in ghost:
        assert torch.allclose(ghost[name], bk[name], rtol=1e-4, atol=1e-6), name
    # the sum of clipped gradients: each sample contributes at most MAX_NORM
    assert torch.cat([g.flatten() for g in bk.values()]).norm() <= MAX_NORM * len(x) + 1e-4


def test_engine_uses_bookkeeping_for_the_mlps_and_ghost_otherwise() -> None:
    x, y = torch.randn(400, 6), torch.randint(0, 2, (400,))
    hyper = {"epsilon": 4.0, "delta": 1e-5, "epochs": 2, "batch_size": 64, "max_grad_norm": 1.0,
             "learning_rate": 0.05}
    out = dpsgd.train(ModelSpec.mlp(hidden=[8]), hyper, x, y, seed=0, device="cpu")
    assert out.grad_sample_mode == "bk" and out.steps == out.planned_steps and out.epsilon <= 4.0
    assert bookkeeping.supports(nn.Sequential(nn.Linear(3, 3), nn.Embedding(4, 3), nn.LayerNorm(3)))
    assert not bookkeeping.supports(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))

    class Twice(nn.Module):  # one layer called twice: its per-sample gradient is a sum the per-call norms miss
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.relu(self.layer(x)))

    assert bookkeeping.supports(Twice()) and not bookkeeping.supports(Twice(), torch.zeros(2, 3))
