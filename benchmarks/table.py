"""Print benchmarks/results.json (written by bench.py) as the markdown table of benchmarks/README.md
(the same rows as the reproduce chapter's speed table: lvae.report.benchmark_tables.benchmark_table)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvae.report.benchmark_tables import benchmark_table  # noqa: E402

machine, rows = benchmark_table(sys.argv[1] if len(sys.argv) > 1 else None)
print(f"Machine: {machine}\n")
print("| " + " | ".join(rows[0]) + " |")
print("|" + "|".join("---:" if k in ("time", "x reference", "GFLOP/s", "% of fp32 peak") else "---" for k in rows[0]) + "|")
for r in rows:
    print("| " + " | ".join(str(v) for v in r.values()) + " |")
