"""The profiles and the runs of the registry with their provenance, as tables (the reproduce chapter)."""
from __future__ import annotations

from typing import Any

from lvae.registry.profiles import available, load_profile
from lvae.registry.runs import list_runs
from lvae.registry.storage import short_device
from lvae.report.run_values import final, lk_label


def profile_rows() -> list[dict[str, Any]]:
    """Every profile of lvae/registry/profiles.yml, one row each."""
    rows = []
    for name in available():
        p = load_profile(name)
        n_iw = "all" if p.iw_subset is None and p.test_subset is None else f"{p.iw_subset or p.test_subset:,}"
        rows.append({"profile": name, "epochs": p.epochs, "warm-up": p.warmup_epochs,
                     "train images": "60,000" if p.subset is None else f"{p.subset:,}",
                     "depths": ", ".join(map(str, p.depths)), "seeds": len(p.seeds), "K": p.iw_k,
                     "test images for L_K": n_iw})
    return rows


def registry_rows(root=None, runs=None) -> list[dict[str, Any]]:
    """The run registry (``lvae runs``) with provenance, or only ``runs`` (e.g. the values of
    ``grid_runs(P)``: the runs the book read); a run's status is shown when it is not complete."""
    rows = []
    for r in (list_runs(root) if runs is None else sorted(runs, key=lambda r: r.name)):
        if r.status == "damaged":  # its provenance cannot be read: the row says so instead of a number
            rows.append({"run": r.name, "epochs": "damaged (lvae runs --json gives the fix)"})
            continue
        prov = r.provenance
        epochs = r.epochs if r.status == "complete" else f"{r.epochs} ({r.status})"
        lk = final(r, "test_LK")
        rows.append({"run": r.name, "epochs": epochs, "test L1": final(r, "test_L1"),
                     "test L_K": None if lk is None else (lk, lk_label(final(r, "iw_k"), final(r, "n_iw"))),
                     "wall [min]": (prov.get("wall_seconds") or 0) / 60, "device": short_device(prov.get("device")),
                     "commit": (prov.get("git_commit") or "—")[:7]})
    return rows
