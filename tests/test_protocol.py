"""The protocol (lvae.report.protocol, book/protocol.md): every config default has a documented source,
every option it names is one `lvae train` accepts, the `paper` profile is the paper's budget, and
the repository cites no file outside itself."""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from lvae.cli import build_parser
from lvae.config import ConfigError
from lvae.registry.profiles import load_profile
from lvae.report import protocol

ROOT = Path(__file__).resolve().parent.parent


def test_every_config_field_has_a_source_and_every_source_a_field():
    assert protocol.undocumented() == []


def test_a_field_without_a_source_is_refused_by_name(monkeypatch):
    sources = dict(protocol.SOURCES)
    del sources[("train", "adam_eps")]
    monkeypatch.setattr(protocol, "SOURCES", sources)
    assert protocol.undocumented() == ["train.adam_eps (no source)"]
    with pytest.raises(ConfigError, match=r"TrainConfig\.adam_eps has no entry in lvae\.report\.protocol\.SOURCES"):
        protocol.field_rows("train")


@pytest.mark.parametrize("section", sorted(protocol.SECTIONS))
def test_rows_show_the_code_defaults_and_options_the_cli_accepts(section):
    cls = protocol.SECTIONS[section]
    rows = {r["field"]: r for r in protocol.field_rows(section)}
    assert list(rows) == [f.name for f in dataclasses.fields(cls)]
    parser = build_parser()
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        assert rows[f.name]["our default"] == (repr(default) if isinstance(default, str) else
                                               protocol._show(default))
        option = rows[f.name]["option"].split(" / ")[0]
        if isinstance(default, bool):
            ns = parser.parse_args(["train", option])
            assert getattr(ns, f"{section}.{f.name}") is True
        else:
            value = {"latent_sizes": "64", "hidden_sizes": "512", "adam_betas": "0.9,0.99"}.get(f.name, "7")
            if f.name in ("inference", "likelihood", "nonlinearity", "up_input", "precision", "bn_stats",
                          "dataset", "init_from"):
                value = "x"
            ns = parser.parse_args(["train", option, value])
            assert getattr(ns, f"{section}.{f.name}") is not None


def test_the_markdown_list_has_one_item_per_field():
    for section, cls in protocol.SECTIONS.items():
        items = protocol.field_markdown(section).splitlines()
        assert [i.split("`")[1] for i in items] == [f.name for f in dataclasses.fields(cls)]


def test_the_paper_profile_is_the_papers_budget():
    p = load_profile("paper")
    b = protocol.PAPER_BUDGET
    assert (p.epochs, p.warmup_epochs, p.subset, p.iw_k, p.test_subset, p.iw_subset) == \
        (b["epochs"], b["warmup_epochs"], b["subset"], b["iw_k"], b["test_subset"], b["iw_subset"])


def test_budget_rows_follow_the_profiles():
    rows = {r["budget"]: r for r in protocol.budget_rows(("cpu", "paper"))}
    cpu = load_profile("cpu")
    assert rows["epochs"]["cpu"] == cpu.epochs
    assert rows["warm-up N_t [epochs]"]["cpu"] == cpu.warmup_epochs
    assert rows["seeds"]["the paper (section 3)"] == "not stated"
    assert rows["test images for L_K"]["paper"] == "all 10,000"
    assert "missing-profile" not in protocol.budget_rows(("cpu", "missing-profile"))[0]


def test_no_file_outside_the_repository_is_cited():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    texts = [f for f in files if f.endswith((".py", ".md", ".yml", ".yaml", ".toml", ".cfg", ".ipynb"))
             and not f.startswith("results/") and f != "tests/test_protocol.py"
             and (ROOT / f).is_file()]  # not a file deleted in the working tree and not yet from the index
    cited = [f for f in texts if any(s in (ROOT / f).read_text(errors="replace")
                                     for s in ("PROTOCOL.md", "../shared/", "/work/shared"))]
    assert cited == [], f"these files cite a file outside the repository: {cited}"
