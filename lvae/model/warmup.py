"""Deterministic warm-up (paper eq 20, section 2.3).

    L_T(x) = -beta KL(q(z|x) || p(z)) + E_q[log p(x|z)],  beta: 0 -> 1 linearly over N_t epochs.

As in the authors' code, beta is 0 in the first epoch and grows by 1/N_t after every epoch,
capped at 1; without warm-up (N_t = 0) beta = 1 throughout.
"""
from __future__ import annotations


def warmup_beta(epoch: int, warmup_epochs: int) -> float:
    """beta for the epoch with 0-based index ``epoch`` (0 = the first epoch)."""
    if epoch < 0:
        raise ValueError(f"epoch={epoch} must be >= 0 "
                         "(0-based: the first epoch is 0)")
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch / warmup_epochs)
