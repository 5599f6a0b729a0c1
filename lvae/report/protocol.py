"""The experimental protocol: where every default of the configuration comes from.

Each field of :class:`~lvae.config.ModelConfig`, :class:`~lvae.config.TrainConfig` and
:class:`~lvae.config.EvalConfig` has one entry in :data:`SOURCES`: the paper's section, equation
or line of text behind its default, or the authors' public code (``casperkaae/LVAE``) where the
paper is silent or differs, or "ours" where neither decides. The book's protocol chapter
(``book/protocol.md``) prints them next to the default, read from the dataclass, and the
``lvae train`` option (the CLI's naming rule, tested against its parser), so the table cannot drift
from what the library does. A field without an entry is an
error: adding a field means documenting where its default comes from.

:data:`PAPER_BUDGET` is the paper's MNIST training budget as its section 3 states it; the ``paper``
profile (``lvae/registry/profiles.yml``) must agree with it (tested), and :func:`budget_rows` sets every
other profile next to it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lvae.config import ConfigError, EvalConfig, ModelConfig, TrainConfig
from lvae.registry.commands import option_name
from lvae.registry.profiles import available, load_profile

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}

# (section, field) -> where the default comes from. "Paper" = Sønderby et al. 2016; "code" = the
# authors' public code, casperkaae/LVAE (run_models.py), read for what the paper does not say.
SOURCES: dict[tuple[str, str], str] = {
    # -- architecture -----------------------------------------------------------------------------
    ("model", "x_dim"): "MNIST's 28×28 pixels (paper section 3); NORB runs set 32×32 = 1024.",
    ("model", "latent_sizes"): "Paper section 3: five stochastic layers of 64, 32, 16, 8 and 4 units, bottom "
                               "to top; shallower models drop layers from the top (--depth).",
    ("model", "hidden_sizes"): "Paper section 3: MLPs of 512 units between x and z1 (or d1), then 256, 128, "
                               "64 and 32, for the VAE and the LVAE alike.",
    ("model", "inference"): "Paper section 2.1 (VAE, eqs 7–12) and 2.2 (LVAE, eqs 13–19); set by --variant.",
    ("model", "batch_norm"): "Paper section 1 and Fig 3 (the +BN variants; set by --variant). Where it "
                             "goes the paper does not say; the code's order: Linear → BN → nonlinearity in "
                             "every MLP layer and in the μ and σ² heads, none on the output layer.",
    ("model", "likelihood"): "Paper eq 3 and section 3: Bernoulli for MNIST and OMNIGLOT, Gaussian for NORB.",
    ("model", "nonlinearity"): "Paper section 3: leaky rectifiers for MNIST and OMNIGLOT, tanh for NORB.",
    ("model", "leak"): "Paper section 3: max(x, 0.1x). The code called Lasagne's leaky rectifier, whose "
                       "default leak is 0.01.",
    ("model", "mlp_layers"): "Paper eq 10 and section 3: two deterministic layers per MLP.",
    ("model", "var_eps"): "Code: a constant 1e-5 added to every latent and output variance. The paper "
                          "has softplus alone (eq 12).",
    ("model", "up_input"): "The paper feeds the upward MLP the previous deterministic layer, d_n = "
                           "MLP(d_{n−1}) (eq 13, 'd'); the code's default feeds it the upward mean μ̂ "
                           "('mu'). Ours: the code.",
    ("model", "share_top_down"): "The paper's top-down Gaussian is the generative p(z_i|z_{i+1}) itself "
                                 "('not increasing the number of parameters', section 2.2; True); the "
                                 "code's default gives inference its own top-down MLP (False). Ours: the "
                                 "code. The KL is against the generative prior either way.",
    # -- optimisation and data --------------------------------------------------------------------
    ("train", "dataset"): "Paper section 3: MNIST, OMNIGLOT and NORB. This book runs MNIST.",
    ("train", "subset"): "Paper section 3: 'the complete training set'. The code joins the 50,000 "
                         "training and 10,000 validation images: all 60,000 (None).",
    ("train", "seed"): "Ours: the paper does not mention seeds. Seeds every random draw (initial "
                       "weights, data order, binarisation, reparameterisation noise).",
    ("train", "batch_size"): "Paper section 3: mini-batches of 256.",
    ("train", "lr"): "Paper section 3: 0.001, constant (section 3.1). The code's README example uses 0.0002.",
    ("train", "adam_betas"): "Paper section 3 names Adam only; the code uses Adam's usual 0.9 and 0.999.",
    ("train", "adam_eps"): "Code: 1e-4 (the paper is silent).",
    ("train", "clip_norm"): "Code: all gradients rescaled to a total norm of at most 4 (the paper is silent).",
    ("train", "clip_value"): "Code: after the rescaling, every gradient element clipped to ±0.9 (the paper "
                             "is silent).",
    ("train", "warmup_epochs"): "Paper section 3: N_t = 200 (eq 20: β rises linearly from 0 to 1 over the "
                                "first N_t epochs); 0 for the variants without warm-up. Step per epoch as "
                                "in the code: β = 0 in the first epoch, +1/N_t after each.",
    ("train", "eq_samples"): "Paper section 3.1: one Monte Carlo sample for the Fig 3 models; 10 when "
                             "finetuning (section 3).",
    ("train", "iw_samples"): "Paper section 3.1: one importance-weighted sample in training; 10 for the "
                             "'+ IW=10' row of Table 1.",
    ("train", "analytic_kl"): "Paper section 2: the KL is 'calculated analytically at each layer when "
                              "possible', otherwise by Monte Carlo. The code uses sampled log-densities "
                              "throughout. Ours: the paper, where the closed form is valid.",
    ("train", "lr_decay"): "Paper section 3, finetuning only: the learning rate multiplied by 0.75 "
                           "(lvae.registry.experiments.finetune_config).",
    ("train", "lr_decay_every"): "Paper section 3, finetuning only: every 200 epochs, for a further 2,000.",
    ("train", "init_from"): "Finetuning continues training a trained model (paper section 3); None: "
                            "a fresh start.",
    ("train", "test_seed"): "The paper does not say how the test set is binarised. The code binarises it "
                            "once, unseeded; ours: once, with this seed.",
    ("train", "precision"): "Ours (the paper names no precision): fp32. 'bf16' is an opt-in faster step "
                            "(matmuls in bf16, densities and the output layer in fp32).",
    ("train", "compile"): "Ours: an opt-in torch.compile of the objective, same noise, different rounding.",
    # -- evaluation -------------------------------------------------------------------------------
    ("eval", "every"): "Ours: train and test L1 and the per-unit KL every this many epochs (the paper "
                       "does not give its evaluation schedule).",
    ("eval", "iw_k"): "Paper section 3: the log-likelihood approximated with 5,000 importance "
                            "samples (eq 6).",
    ("eval", "iw_every"): "Ours: L_K only after the last epoch (0). The code's README runs computed it "
                          "every 100 epochs.",
    ("eval", "test_subset"): "Paper: the MNIST test set, all 10,000 images (None).",
    ("eval", "iw_subset"): "Paper: L5000 on the test set (None = the same images as L1). The cpu "
                           "profiles use a prefix to save time.",
    ("eval", "train_subset"): "Ours: train L1 (Fig 3a) on one fixed binarisation of the first 10,000 "
                              "training images; the paper does not say on how many.",
    ("eval", "iw_chunk"): "Ours: importance samples per chunk; memory only, the value is unchanged.",
    ("eval", "bn_stats"): "The paper is silent. The code evaluates with population statistics over the "
                          "data set; ours recomputes them over train_subset training images before "
                          "every evaluation ('running': PyTorch's running averages).",
}

# The paper's MNIST training budget (section 3): 2,000 epochs on the complete training set,
# warm-up over N_t epochs, test log-likelihood with K importance samples on the test set. What is a
# config field is the config's default (lvae.config, the one source: N_t = 200, K = 5,000).
PAPER_BUDGET: dict[str, Any] = {"epochs": 2000, "warmup_epochs": TrainConfig().warmup_epochs,
                                "subset": TrainConfig().subset, "iw_k": EvalConfig().iw_k,
                                "test_subset": EvalConfig().test_subset, "iw_subset": EvalConfig().iw_subset}


def source(section: str, name: str) -> str:
    """Where the default of ``section``'s field ``name`` comes from; a clear error when undocumented."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; choose one of {sorted(SECTIONS)}")
    try:
        return SOURCES[(section, name)]
    except KeyError:
        raise ConfigError(f"{SECTIONS[section].__name__}.{name} has no entry in lvae.report.protocol.SOURCES; "
                          f"add one saying where its default comes from") from None


def cli_option(section: str, name: str) -> str:
    """The ``lvae train`` option that sets ``section``'s field ``name`` (the naming rule of
    :func:`lvae.registry.commands.option_name`: ``--field-name``, ``--eval-`` before evaluation fields but
    ``--iw-k``, ``--no-`` for false)."""
    cls = SECTIONS[section]
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None:
        raise ConfigError(f"{cls.__name__} has no field {name!r}")
    opt = option_name(section, name)
    return f"{opt} / --no-{opt[2:]}" if isinstance(field.default, bool) else opt


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def field_rows(section: str) -> list[dict[str, str]]:
    """One row per field of ``section``'s config class: its default, its option and its source."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; choose one of {sorted(SECTIONS)}")
    cls = SECTIONS[section]
    defaults = cls()
    return [{"field": f.name, "our default": _show(getattr(defaults, f.name)), "option": cli_option(section, f.name),
             "source": source(section, f.name)} for f in dataclasses.fields(cls)]


def field_markdown(section: str) -> str:
    """:func:`field_rows` as a Markdown list (the sources are sentences: a list wraps them where a
    one-line-per-cell table would not): ``- `field` = default (`--option`): source``."""
    return "\n".join(f"- `{r['field']}` = `{r['our default']}` (`{r['option']}`): {r['source']}"
                     for r in field_rows(section))


def undocumented() -> list[str]:
    """Config fields without a SOURCES entry, and SOURCES entries naming no field (both should be empty)."""
    fields = {(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    return sorted(f"{s}.{n} (no source)" for s, n in fields - set(SOURCES)) + \
        sorted(f"{s}.{n} (no such field)" for s, n in set(SOURCES) - fields)


def _images(n: int | None, total: str) -> str:
    return total if n is None else f"{n:,}"


def _step(train: dict[str, Any]) -> str:
    parts = [train.get("precision", TrainConfig.precision)]
    if train.get("compile", TrainConfig.compile):
        parts.append("compiled")
    return ", ".join(parts)


def budget_rows(profiles: tuple[str, ...] = ("cpu", "cpu-long", "paper")) -> list[dict[str, Any]]:
    """The paper's budget next to each profile's, one row per budget item (profiles not defined in
    lvae/registry/profiles.yml are left out)."""
    ps = [load_profile(name) for name in profiles if name in available()]
    b = PAPER_BUDGET
    items = {
        "epochs": (b["epochs"], lambda p: p.epochs),
        "warm-up N_t [epochs]": (b["warmup_epochs"], lambda p: p.warmup_epochs),
        "training images": (_images(b["subset"], "all 60,000"), lambda p: _images(p.subset, "all 60,000")),
        "depths": ("1–5", lambda p: ", ".join(map(str, p.depths))),
        "seeds": ("not stated", lambda p: ", ".join(map(str, p.seeds))),
        "test images for L1": (_images(b["test_subset"], "all 10,000"), lambda p: _images(p.test_subset, "all 10,000")),
        "K of L_K": (b["iw_k"], lambda p: p.iw_k),
        "test images for L_K": (_images(b["iw_subset"], "all 10,000"),
                                lambda p: _images(p.iw_subset if p.iw_subset is not None else p.test_subset,
                                                  "all 10,000")),
        "training step": ("not stated", lambda p: _step(dict(p.train))),
    }
    return [{"budget": item, "the paper (section 3)": paper_value, **{p.name: get(p) for p in ps}}
            for item, (paper_value, get) in items.items()]
