"""The engine's Poisson batches (`dpsgd.poisson_batch`): each row in independently with the sampling rate, the
sampling Opacus' accountant assumes. Checked statistically over many draws; every bound below is at least 5
standard deviations wide, so a correct sampler fails one of them less than once in a million runs."""

from __future__ import annotations

import math

import pytest
import torch

from veil.executor.dpsgd import poisson_batch

DRAWS = 4000


@pytest.mark.parametrize(("n", "rate"), [(1000, 0.05), (200, 0.5), (50, 0.002)])
def test_each_row_is_in_independently_at_the_rate(n: int, rate: float) -> None:
    generator = torch.Generator().manual_seed(21)
    chosen = torch.zeros(DRAWS, n, dtype=torch.bool)
    for d in range(DRAWS):
        rows = poisson_batch(n, rate, generator)
        assert rows.dtype == torch.int64 and bool((rows[1:] > rows[:-1]).all())  # ascending, no row twice
        assert len(rows) == 0 or (0 <= int(rows[0]) and int(rows[-1]) < n)
        chosen[d, rows] = True
    # the batch size is Binomial(n, rate): its mean and its variance
    sizes = chosen.sum(1).double()
    mean, var = n * rate, n * rate * (1 - rate)
    assert abs(float(sizes.mean()) - mean) <= 5 * math.sqrt(var / DRAWS)
    excess_kurtosis = (1 - 6 * rate * (1 - rate)) / var  # Binomial's: the sample variance's spread
    assert abs(float(sizes.var()) / var - 1) <= 5 * math.sqrt((2 + excess_kurtosis) / DRAWS)
    # every row alike: the first, the middle and the last row (the ends are where a gap method goes wrong)
    for row in (0, n // 2, n - 1):
        assert abs(float(chosen[:, row].double().mean()) - rate) <= 5 * math.sqrt(rate * (1 - rate) / DRAWS) + 1e-9
    # neighbours independent: both in as often as rate^2
    both = (chosen[:, :-1] & chosen[:, 1:]).double().mean()
    pairs = DRAWS * (n - 1)
    assert abs(float(both) - rate**2) <= 5 * math.sqrt(rate**2 * (1 - rate**2) / pairs) * math.sqrt(2)


def test_a_seed_fixes_the_batches() -> None:
    first = [poisson_batch(500, 0.1, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
