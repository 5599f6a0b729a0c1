"""Reading and writing ``lvae_format`` 1 state dicts: the keys of the weights and checkpoints written
before the per-layer blocks, which grouped the modules by role (``generative.top_down_mlps.{i}``,
``inference.up_heads.{i}``, ...) instead of by layer (``layers.{i}.prior.mlp``, ...).

:func:`upgrade_state_dict` renames such keys to today's (the models' ``load_state_dict`` calls it),
:func:`format_1_state_dict` the other way (checkpoints are still written with them), and
:func:`format_1_rank` gives a key's place in that format's parameter order, which
:meth:`lvae.model.network.HierarchicalVAE.named_parameters` keeps: the optimizer states of checkpoints are by
position, and the gradient norm of the clipping sums the per-tensor norms in that order.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

# (key prefix in lvae_format 1, key prefix now), in that format's parameter order; "{i}" is the
# layer, "{up}" is "up_" for the LVAE and "" for the VAE.
FORMAT_1_KEYS = (
    ("generative.top_down_mlps.{i}.", "layers.{i}.prior.mlp."),
    ("generative.top_down_heads.{i}.", "layers.{i}.prior.head."),
    ("generative.output_mlp.", "likelihood.mlp."),
    ("generative.output.", "likelihood."),
    ("inference.{up}mlps.{i}.", "layers.{i}.up.mlp."),
    ("inference.{up}heads.{i}.", "layers.{i}.up.head."),
    ("inference.down_mlps.{i}.", "layers.{i}.down.mlp."),
    ("inference.down_heads.{i}.", "layers.{i}.down.head."),
)

KeyPairs = Sequence[tuple[re.Pattern, str]]


def _prefix_regex(prefix: str, up: str) -> re.Pattern:
    return re.compile(re.escape(prefix.replace("{up}", up)).replace(re.escape("{i}"), r"(\d+)"))


def _rename(key: str, pairs: KeyPairs) -> tuple[str, int, int]:
    """(renamed key, rank of its role, layer) by the first matching prefix; the key unchanged if none."""
    for rank, (pattern, target) in enumerate(pairs):
        m = pattern.match(key)
        if m:
            layer = m.group(1) if pattern.groups else "0"
            return target.replace("{i}", layer) + key[m.end():], rank, int(layer)
    return key, len(pairs), 0


def key_pairs(ladder: bool, to_format_1: bool) -> list[tuple[re.Pattern, str]]:
    """(pattern of a key prefix, its replacement) per role, in lvae_format 1's order: today's keys to
    that format's (``to_format_1``) or back. ``ladder``: the model's inference is ``"ladder"`` (the
    VAE's were ``inference.mlps``/``inference.heads``)."""
    up = "up_" if ladder else ""
    if to_format_1:
        return [(_prefix_regex(new, up), old.replace("{up}", up)) for old, new in FORMAT_1_KEYS]
    return [(_prefix_regex(old, up), new) for old, new in FORMAT_1_KEYS]


def format_1_rank(key: str, pairs: KeyPairs) -> tuple[int, int]:
    """(role, layer) of today's ``key`` in lvae_format 1's parameter order, ``pairs`` =
    ``key_pairs(ladder, to_format_1=True)``: sorting by it lists the parameters role by role (priors'
    MLPs, priors' heads, likelihood, upward MLPs, upward heads, top-down MLPs, top-down heads), then
    layer by layer."""
    _, role, layer = _rename(key, pairs)
    return role, layer


def upgrade_state_dict(state: Mapping[str, torch.Tensor], ladder: bool) -> dict[str, torch.Tensor]:
    """A state dict with ``lvae_format`` 1 keys (``generative.*``, ``inference.*``) renamed to today's
    block keys (``layers.{i}.*``, ``likelihood.*``); today's keys pass unchanged. ``ladder``: the
    model's inference is ``"ladder"`` (the VAE's were ``inference.mlps``/``inference.heads``)."""
    pairs = key_pairs(ladder, to_format_1=False)
    return {_rename(k, pairs)[0]: v for k, v in state.items()}


def format_1_state_dict(state: Mapping[str, torch.Tensor], ladder: bool) -> dict[str, torch.Tensor]:
    """The inverse of :func:`upgrade_state_dict`: today's keys renamed to ``lvae_format`` 1's."""
    pairs = key_pairs(ladder, to_format_1=True)
    return {_rename(k, pairs)[0]: v for k, v in state.items()}
