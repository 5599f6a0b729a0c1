"""The torch floor: what the code needs (torch.nn.utils.get_total_norm and clip_grads_with_norm_ are new in 2.6),
declared in pyproject.toml and environment.yml, and checked at import with a message that names the fix."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lvae

ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_is_what_the_code_uses():
    assert lvae.TORCH_FLOOR == (2, 6)
    assert callable(torch.nn.utils.get_total_norm) and callable(torch.nn.utils.clip_grads_with_norm_)
    assert callable(torch.compiler.is_compiling)


def test_pyproject_and_environment_declare_the_floor():
    floor = ".".join(map(str, lvae.TORCH_FLOOR))
    assert re.search(rf'"torch>={re.escape(floor)},', (ROOT / "pyproject.toml").read_text())
    assert re.search(rf"pytorch>={re.escape(floor)},", (ROOT / "environment.yml").read_text())


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0+cu124", "2.11.0+cu130", "2.13.0+cpu", "3.0.0a0+git1234"])
def test_a_torch_at_or_above_the_floor_passes(version):
    lvae.check_torch(version)


@pytest.mark.parametrize("version", ["2.1.0", "2.5.1+cu121", "1.13.1"])
def test_an_older_torch_is_refused_naming_the_fix(version):
    with pytest.raises(ImportError, match=rf"lvae needs torch >= 2\.6 .* this Python has torch {re.escape(version)}\. "
                                          r"Upgrade it: pip install 'torch>=2\.6'"):
        lvae.check_torch(version)


def test_importing_lvae_with_an_older_torch_fails_with_that_message():
    code = "import torch; torch.__version__ = '2.5.1+cu121'; import lvae"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "ImportError: lvae needs torch >= 2.6" in p.stderr and "pip install 'torch>=2.6'" in p.stderr
