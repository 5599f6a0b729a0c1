"""lvae.warmup: the beta schedule of eq 20."""
import pytest

import lvae


def test_warmup_beta_schedule():
    assert [lvae.warmup_beta(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lvae.warmup_beta(0, 0) == 1.0
    with pytest.raises(ValueError):
        lvae.warmup_beta(-1, 10)
