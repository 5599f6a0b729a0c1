"""Test-only fault injection: SIGKILL a process at a chosen point of the product code.

A fault spec is ``<kind>:<target>:<n>[,<kind>:<target>:<n>...]``; the process is killed the
``n``-th time (counted per process, so a resumed process counts from 1 again) it reaches

* ``in:<function>`` -- the start of a call of the lvae function (or ``<Class>.<method>``)
  ``<function>`` (mid-step, mid-evaluation), e.g. ``in:clip_gradients:13``;
* ``after:<function>`` -- the return of such a call, e.g. ``after:FlatAdam.step:13`` (after an
  optimizer step) or ``after:evaluate:1`` (an evaluation computed, its row not yet written);
* ``rename:<file>`` -- the rename of a fsynced temp file over ``<file>`` (``os.replace``), e.g.
  ``rename:checkpoint.pt:2``;
* ``append:<file>`` -- a write to ``<file>`` itself (``os.write``): half of it is written and
  fsynced, leaving a torn last line, e.g. ``append:metrics.jsonl:1``.

Nothing of this is in the product code: :func:`install` patches ``os.replace``, ``os.write`` and
the lvae function (where it is defined and in every loaded ``lvae`` module that imported it by name)
or the method on its class.

As a script, ``python tests/faults.py SPEC ROOT RUN_CONFIG_JSON EVAL_CONFIG_JSON EPOCHS`` installs
SPEC (none when empty), then trains with :func:`lvae.training.loop.get_or_train` on one thread.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import torch

from lvae.config import EvalConfig, RunConfig
from lvae.training.loop import get_or_train

KINDS = ("in", "after", "rename", "append")


def sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str) -> list[tuple[str, str, int]]:
    """``"rename:checkpoint.pt:2,in:clip_gradients:13"`` -> ``[("rename", "checkpoint.pt", 2), ...]``."""
    points = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rest = item.partition(":")
        target, _, n = rest.rpartition(":")
        if kind not in KINDS or not target or not n.isdigit() or int(n) < 1:
            raise ValueError(f"fault {item!r}: expected <kind>:<target>:<n> with kind in {KINDS}, "
                             f"e.g. rename:checkpoint.pt:2")
        points.append((kind, target, int(n)))
    return points


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
    except OSError:
        return ""


def _defined(name: str, modules: list) -> object:
    """The function or class called ``name`` that one of the loaded lvae ``modules`` defines."""
    for module in modules:
        value = vars(module).get(name)
        if callable(value) and getattr(value, "__module__", None) == module.__name__:
            return value
    raise ValueError(f"fault target {name!r}: no loaded lvae module defines a function or class of that name")


def install(spec: str, kill: Callable[[], None] = sigkill) -> Callable[[], None]:
    """Install the faults of ``spec``; ``kill`` is called at each point reached. Returns the undo."""
    points = parse(spec)
    counts: dict[tuple[str, str], int] = {}
    undo: list[Callable[[], None]] = []

    def reached(kind: str, target: str) -> bool:
        wanted = [n for k, t, n in points if (k, t) == (kind, target)]
        if not wanted:
            return False
        counts[kind, target] = counts.get((kind, target), 0) + 1
        return counts[kind, target] in wanted

    def patch(owner, name: str, new) -> None:
        old = getattr(owner, name)
        setattr(owner, name, new)
        undo.append(lambda: setattr(owner, name, old))

    real_replace, real_write = os.replace, os.write
    if any(k == "rename" for k, _, _ in points):
        def replace(src, dst, *args, **kwargs):
            if reached("rename", Path(dst).name):
                kill()
            return real_replace(src, dst, *args, **kwargs)
        patch(os, "replace", replace)
    if any(k == "append" for k, _, _ in points):
        def write(fd, data):
            if reached("append", _fd_name(fd)):
                written = real_write(fd, bytes(data)[:len(data) // 2])
                os.fsync(fd)
                kill()
                return written
            return real_write(fd, data)
        patch(os, "write", write)
    lvae_modules = [m for key, m in sys.modules.items() if key == "lvae" or key.startswith("lvae.")]
    for name in {t for k, t, _ in points if k in ("in", "after")}:
        owner_name, _, method = name.rpartition(".")
        real = getattr(_defined(owner_name, lvae_modules), method) if owner_name else _defined(name, lvae_modules)

        def wrapper(*args, _name=name, _real=real, **kwargs):
            if reached("in", _name):
                kill()
            out = _real(*args, **kwargs)
            if reached("after", _name):
                kill()
            return out
        if owner_name:  # a method: patched on its class
            patch(_defined(owner_name, lvae_modules), method, wrapper)
            continue
        for module in lvae_modules:  # where it is defined and every module that imported it by name
            for attr, value in list(vars(module).items()):
                if value is real:
                    patch(module, attr, wrapper)

    def restore() -> None:
        while undo:
            undo.pop()()
    return restore


def main(argv: list[str]) -> None:
    spec, root, run_config, eval_config, epochs = argv
    torch.set_num_threads(1)
    install(spec)
    get_or_train(RunConfig.from_dict(json.loads(run_config)), int(epochs), EvalConfig(**json.loads(eval_config)),
                 root=root, progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
