"""Train (or resume) every run of a profile's grid into the registry, most important first.

    python scripts/train_profile.py cpu [--threads 1]

The two analysis models (the deepest LVAE+BN+WU and VAE+BN+WU) come first, then the rest of the
grid from deep to shallow. Safe to kill and re-run: finished runs are reused, partial ones resume.
"""
import argparse

import torch

from lvae.profiles import get_run, load_profile

ap = argparse.ArgumentParser()
ap.add_argument("profile")
ap.add_argument("--threads", type=int, default=None)
ns = ap.parse_args()
if ns.threads:
    torch.set_num_threads(ns.threads)
p = load_profile(ns.profile)
order = [(v, p.max_depth) for v in p.keep_weights]
order += [(v, d) for d in sorted(p.depths, reverse=True) for v in p.variants if (v, d) not in order]
for seed in p.seeds[:1]:
    for v, d in order:
        run = get_run(p, v, d, seed)
        m = run.metrics()[-1]
        print(f"{run.name}: test L1 {m['test_L1']:.2f}  L{m.get('iw_k', '-')} {m.get('test_LK', float('nan')):.2f}", flush=True)
