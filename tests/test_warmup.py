"""lvae.model.warmup: the beta schedule of eq 20 -- linear from 0 to 1 over N_t epochs, 1 afterwards, and
1 throughout without warm-up (N_t = 0)."""
import pytest

import lvae
from lvae.model.warmup import warmup_beta


def test_warmup_beta_schedule():
    assert [lvae.warmup_beta(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lvae.warmup_beta(0, 0) == 1.0
    with pytest.raises(ValueError):
        lvae.warmup_beta(-1, 10)


@pytest.mark.parametrize("n_t", [1, 3, 10, 200])
def test_beta_is_linear_from_zero_to_one_over_n_t_epochs(n_t):
    """beta(e) = e / N_t for e <= N_t: 0 in the first epoch, equal steps of 1/N_t, exactly 1 at N_t."""
    betas = [warmup_beta(e, n_t) for e in range(n_t + 1)]
    assert betas[0] == 0.0 and betas[-1] == 1.0
    assert betas == pytest.approx([e / n_t for e in range(n_t + 1)], abs=0, rel=1e-15)
    steps = [b - a for a, b in zip(betas, betas[1:])]
    assert steps == pytest.approx([1 / n_t] * n_t, rel=1e-9)
    assert all(0.0 <= b <= 1.0 for b in betas)


@pytest.mark.parametrize("n_t", [1, 5, 200])
def test_beta_is_one_after_warmup(n_t):
    assert all(warmup_beta(e, n_t) == 1.0 for e in range(n_t, n_t + 50))
    assert warmup_beta(10**6, n_t) == 1.0


def test_no_warmup_means_beta_one_always():
    assert all(warmup_beta(e, 0) == 1.0 for e in range(100))
    assert warmup_beta(0, -5) == 1.0  # a non-positive N_t is no warm-up


def test_beta_is_a_float_and_epochs_are_zero_based():
    assert isinstance(warmup_beta(3, 6), float) and warmup_beta(3, 6) == 0.5
    with pytest.raises(ValueError, match="0-based"):
        warmup_beta(-1, 0)
