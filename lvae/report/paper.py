"""Every number the paper reports, transcribed from its text (Table 1, Table 2, section 3).

Values are test-set log-likelihood bounds in nats (higher is better). Figures 3, 7 and 8 are plots
without tabulated values; only the numbers below are exact. Chapters print "paper vs ours vs gap"
with :func:`compare`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperNumber:
    key: str  # short label used by chapters
    value: float
    dataset: str
    what: str  # the quantity, e.g. "test L5000"
    model: str
    source: str  # "Table 1", "Table 2", "text (section 3)"


_TABLE1 = [  # MNIST test, <= log p(x)
    ("t1_vae1_nf", -85.10, "VAE 1-layer + NF [Rezende & Mohamed]"),
    ("t1_iwae2_iw1", -85.33, "IWAE 2-layer + IW=1 [Burda et al.]"),
    ("t1_iwae2_iw50", -82.90, "IWAE 2-layer + IW=50 [Burda et al.]"),
    ("t1_vae2_vgp", -81.90, "VAE 2-layer + VGP [Tran et al.]"),
    ("t1_lvae5", -82.12, "LVAE 5-layer"),
    ("t1_lvae5_ft", -81.84, "LVAE 5-layer + finetuning"),
    ("t1_lvae5_ft_iw10", -81.74, "LVAE 5-layer + finetuning + IW=10"),
]

_TEXT = [  # MNIST, section 3 (Fig 3)
    ("mnist_lvae5_test_L1", -85.23, "test L1", "LVAE+BN+WU 5-layer"),
    ("mnist_best_vae_test_L1", -87.49, "test L1", "best VAE, 3-layer (VAE+BN+WU by context)"),
    ("mnist_lvae5_test_L5000", -82.12, "test L5000", "LVAE+BN+WU 5-layer"),
    ("mnist_best_vae_test_L5000", -82.74, "test L5000", "best VAE (depth, variant not stated)"),
    ("omniglot_best_iwae", -103.38, "test log-likelihood", "IWAE [Burda et al.] (best)"),
]

TABLE2_COLUMNS = ("VAE", "VAE+BN", "VAE+BN+WU", "LVAE+BN+WU")
_TABLE2 = {  # (dataset, number of latent layers) -> one value per column (None = not reported)
    ("omniglot", 1): (-111.21, -105.62, -104.51, None),
    ("omniglot", 2): (-110.58, -105.51, -102.61, -102.63),
    ("omniglot", 3): (-111.26, -106.09, -102.52, -102.18),
    ("omniglot", 4): (-111.58, -105.66, -102.66, -102.21),
    ("omniglot", 5): (-110.46, -105.45, -102.48, -102.11),
    ("norb", 1): (2741, 3198, 3338, None),
    ("norb", 2): (2792, 3224, 3483, 3272),
    ("norb", 3): (2786, 3235, 3492, 3519),
    ("norb", 4): (2689, 3201, 3482, 3449),
    ("norb", 5): (2654, 3198, 3422, 3455),
}
LATENT_LABELS = {1: "64", 2: "64-32", 3: "64-32-16", 4: "64-32-16-8", 5: "64-32-16-8-4"}
VARIANT_KEYS = {"VAE": "vae", "VAE+BN": "vae_bn", "VAE+BN+WU": "vae_bn_wu", "LVAE+BN+WU": "lvae_bn_wu"}


def _build() -> dict[str, PaperNumber]:
    out: dict[str, PaperNumber] = {}
    for key, value, model in _TABLE1:
        out[key] = PaperNumber(key, value, "mnist", "test log-likelihood bound", model, "Table 1")
    for key, value, what, model in _TEXT:
        dataset = key.split("_")[0]
        out[key] = PaperNumber(key, value, dataset, what, model, "text (section 3)")
    for (dataset, depth), values in _TABLE2.items():
        for column, value in zip(TABLE2_COLUMNS, values):
            if value is not None:
                key = f"t2_{dataset}_{VARIANT_KEYS[column]}_{depth}"
                out[key] = PaperNumber(key, float(value), dataset, "test log-likelihood",
                                       f"{column} {LATENT_LABELS[depth]}", "Table 2")
    return out


NUMBERS: dict[str, PaperNumber] = _build()


def get(key: str) -> PaperNumber:
    try:
        return NUMBERS[key]
    except KeyError:
        raise KeyError(f"no paper number {key!r}; known keys: {sorted(NUMBERS)}") from None


def table2(dataset: str, variant: str, depth: int) -> float | None:
    """Table 2 value for ``dataset`` in {"omniglot", "norb"}, ``variant`` in TABLE2_COLUMNS."""
    return _TABLE2[(dataset, depth)][TABLE2_COLUMNS.index(variant)]


def compare(key: str, ours: float | None) -> dict[str, object]:
    """One row of a "paper vs ours vs gap" table; gap = ours - paper (negative: we are worse)."""
    ref = get(key)
    return {"model": ref.model, "quantity": ref.what, "source": ref.source, "paper": ref.value,
            "ours": ours, "gap": None if ours is None else ours - ref.value}
