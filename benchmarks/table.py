"""Print benchmarks/results.json (written by bench.py) as the markdown table of benchmarks/README.md."""
import json
import sys
from pathlib import Path

res = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("results.json")).read_text())
m = res["machine"]
print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), torch {m['torch']}, {m['date']}; "
      f"load average {m['load_start'][0]:.1f} at the start, {m.get('load_end', [float('nan')])[0]:.1f} at the end. "
      f"Matmul peak measured in the same run: fp32 {res['peak']['float32']:.0f} GFLOP/s, "
      f"bf16 {res['peak']['bfloat16']:.0f} GFLOP/s.\n")
print("| benchmark | implementation | time | x reference | GFLOP/s | % of fp32 peak | notes |")
print("|---|---|---:|---:|---:|---:|---|")
for r in res["rows"]:
    ms = r["ms"]
    t = f"{ms:.1f} ms" if ms < 1_000 else f"{ms / 1000:.1f} s"
    ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
    gf = f"{r['gflops']:.1f}" if "gflops" in r else ""
    pk = f"{100 * r['peak_frac']:.0f}%" if "peak_frac" in r else ""
    notes = []
    if "wall_ms" in r:
        notes.append(f"wall {r['wall_ms'] / 1000:.1f} s" if r["wall_ms"] >= 1_000 else f"wall {r['wall_ms']:.1f} ms")
    if "extrapolated_full_test_min" in r:
        notes.append(f"full 10k test set: {r['extrapolated_full_test_min']:.1f} min (extrapolated)")
    if "test_L1" in r:
        notes.append(f"test L1 {r['test_L1']:.3f}")
    if "diff_vs_fp32" in r:
        notes.append(f"bf16 - fp32 = {r['diff_vs_fp32']:+.3f} nats (per seed: "
                     f"{', '.join(f'{d:+.2f}' for d in r['per_seed_diff'])})")
    if "ok" in r and not r["ok"]:
        notes.append("FAILED")
    print(f"| {r['what']} | {r['impl']} | {t} | {ratio} | {gf} | {pk} | {'; '.join(notes)} |")
