"""Train (or resume) every run of a profile's grid into the registry, most important first.

    python scripts/train_profile.py cpu [--seeds 0,1,2] [--variants vae,lvae_bn_wu] [--depths 5,4] [--threads 1]

Depth by depth from the deepest, each depth's seeds before the next depth; within a seed the
profile's `keep_weights` variants (the models the analysis chapters use) first. Safe to kill and
re-run: finished runs are reused, partial ones resume from their checkpoint.
"""
import argparse
import time

import torch

from lvae.registry.profiles import load_profile
from lvae.registry.storage import RunLockedError
from lvae.training.profile_runs import get_run


def _ints(text):
    return tuple(int(s) for s in text.split(",")) if text else None


ap = argparse.ArgumentParser()
ap.add_argument("profile")
ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
ap.add_argument("--variants", default=None, help="comma-separated variants, in this order (default: the profile's)")
ap.add_argument("--depths", default=None, help="comma-separated depths (default: the profile's)")
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--reverse", action="store_true",
                help="the same runs in the opposite order: a second worker on the same list (a run another "
                     "process trains is skipped)")
ns = ap.parse_args()
if ns.threads:
    torch.set_num_threads(ns.threads)
p = load_profile(ns.profile)
seeds = _ints(ns.seeds) or p.seeds
depths = sorted(_ints(ns.depths) or p.depths, reverse=True)
variants = tuple(ns.variants.split(",")) if ns.variants else \
    tuple(v for v in p.keep_weights if v in p.variants) + tuple(v for v in p.variants if v not in p.keep_weights)
todo = [(v, d, seed) for d in depths for seed in seeds for v in variants]
for v, d, seed in reversed(todo) if ns.reverse else todo:
    t0 = time.time()
    try:
        run = get_run(p, v, d, seed, progress=False)
    except RunLockedError:
        print(f"{v}-{d} seed {seed}: trained by another process, skipped", flush=True)
        continue
    m = run.metrics()[-1] if run.metrics() else {}
    print(f"{run.name} [{run.status}, {time.time() - t0:.0f} s]: test L1 {m.get('test_L1', float('nan')):.2f}  "
          f"L{m.get('iw_k', '-')} {m.get('test_LK', float('nan')):.2f}", flush=True)
