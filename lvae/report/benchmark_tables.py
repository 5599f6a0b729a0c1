"""The speed benchmarks' results (``benchmarks/results.json``, written by ``benchmarks/bench.py``) as
tables for the book and for ``benchmarks/table.py``: the machine they ran on, one row per result,
and a narrow form with one column per implementation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lvae.registry.runs import results_dir

__all__ = ["BENCHMARK_IMPLS", "benchmark_results_path", "benchmark_table", "benchmark_summary"]


def benchmark_results_path() -> Path | None:
    """``benchmarks/results.json`` of the repository (a source checkout, or the clone whose
    ``results/`` the registry reads, as in Colab); None when there is none."""
    for root in (Path(__file__).resolve().parents[2], results_dir().resolve().parent):
        if (root / "benchmarks" / "results.json").exists():
            return root / "benchmarks" / "results.json"
    return None


def benchmark_table(path=None) -> tuple[str, list[dict[str, Any]]]:
    """(machine description, rows) of the speed benchmark results written by ``benchmarks/bench.py``."""
    path = path or benchmark_results_path()
    if path is None:
        raise FileNotFoundError("no benchmarks/results.json: run `python benchmarks/bench.py` in the repository")
    res = json.loads(Path(path).read_text())
    m = res["machine"]
    timing = "CPU time of one thread" if m["threads"] == 1 else f"wall time, {m['threads']} threads"
    commit = f", commit {m['git_commit'][:7]}{' (modified)' if m.get('git_dirty') else ''}" \
        if m.get("git_commit") else ""
    machine = (f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s) ({timing}), torch {m['torch']}, "
               f"{m['date']}{commit}; load average {m['load_start'][0]:.1f} at the start, "
               f"{m.get('load_end', [float('nan')])[0]:.1f} at the end. Matmul peak measured in the same run: "
               f"fp32 {res['peak']['float32']:.0f} GFLOP/s, bf16 {res['peak']['bfloat16']:.0f} GFLOP/s.")
    rows = []
    for r in res["rows"]:
        ms = r["ms"]
        notes = []
        if "wall_ms" in r and m["threads"] == 1:
            notes.append(f"wall {r['wall_ms'] / 1000:.1f} s" if r["wall_ms"] >= 1_000 else f"wall {r['wall_ms']:.1f} ms")
        if "compile_s" in r:
            notes.append(f"first steps incl. compilation {r['compile_s']:.0f} s")
        if "extrapolated_full_test_min" in r:
            notes.append(f"full 10k test set: {r['extrapolated_full_test_min']:.1f} min (extrapolated)")
        if "test_L1" in r:
            notes.append(f"test L1 {r['test_L1']:.3f}")
        if "diff_vs_fp32" in r:
            notes.append(f"bf16 - fp32 = {r['diff_vs_fp32']:+.3f} nats (per seed: "
                         f"{', '.join(f'{d:+.2f}' for d in r['per_seed_diff'])})")
        if "ok" in r and not r["ok"]:
            notes.append("FAILED")
        rows.append({"benchmark": r["what"], "implementation": r["impl"],
                     "time": f"{ms:.1f} ms" if ms < 1_000 else f"{ms / 1000:.1f} s",
                     "x reference": f"{r['ratio']:.2f}" if "ratio" in r else "",
                     "GFLOP/s": f"{r['gflops']:.1f}" if "gflops" in r else "",
                     "% of fp32 peak": f"{100 * r['peak_frac']:.0f}%" if "peak_frac" in r else "",
                     "notes": "; ".join(notes)})
    return machine, rows


BENCHMARK_IMPLS = ("reference", "library fp32", "library fp32 compiled", "library bf16", "library bf16 compiled")


def benchmark_summary(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`benchmark_table` rows in a narrow form for the book: one row per benchmark measured against
    the reference, one column per implementation (cells: time, x reference, % of fp32 peak); and every
    other result (grid, bf16 quality, book rebuild) and every note as a sentence."""
    by_what: dict[str, dict[str, Any]] = {}
    sentences = []
    for r in rows:
        if r["implementation"] in BENCHMARK_IMPLS and r["x reference"]:
            cell = tuple(c for c in (r["time"], r["x reference"] and f"{r['x reference']}x",
                                     r["% of fp32 peak"]) if c)
            by_what.setdefault(r["benchmark"], {"benchmark": r["benchmark"]})[r["implementation"]] = cell
            if r["notes"]:
                sentences.append(f"{r['benchmark']}, {r['implementation']}: {r['notes']}")
        else:
            sentences.append(f"{r['benchmark']}, {r['implementation']}: {r['time']}"
                             + (f", {r['x reference']}x" if r["x reference"] else "")
                             + (f"; {r['notes']}" if r["notes"] else ""))
    return list(by_what.values()), sentences
