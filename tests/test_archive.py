"""Moving runs between registries (lvae.registry.archive, `lvae runs export` / `lvae runs import`): a round
trip keeps every number and the weights; every refusal names the fix and leaves the destination
registry exactly as it was."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from lvae import cli
from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.registry.archive import MANIFEST, ArchiveError, export_runs, import_runs
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, Run
from lvae.registry.storage import run_lock
from lvae.training.loop import get_or_train

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = "mnist-vae_bn_wu-5-c9cd6df346"  # a committed, complete run with fp16 weights, evals and per-image values
MODEL = ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8))
CONFIG = RunConfig("reg", MODEL, TrainConfig(dataset="synthetic", subset=128, batch_size=32, warmup_epochs=1))
PARTIAL = RunConfig("part", MODEL, TrainConfig(dataset="synthetic", subset=128, batch_size=32, seed=1))
ECONFIG = EvalConfig(every=1, iw_k=8, iw_chunk=4, test_subset=64, train_subset=64)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory, one_thread) -> Path:
    """A registry with a complete tiny run (checkpoint and fp16 weights) and a partial one. Read only."""
    root = tmp_path_factory.mktemp("source")
    get_or_train(CONFIG, 2, ECONFIG, root=root, progress=False)
    get_or_train(PARTIAL, 2, ECONFIG, root=root, progress=False, stop_after=1)
    return root


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its content: the state a refusal must keep."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_tar(archive: Path, content: dict[str, bytes], manifest: bool = True) -> Path:
    """Write ``content`` as a tar; with ``manifest``, make manifest.json list exactly those files
    (sizes and SHA-256 recomputed), so that only the deeper checks can refuse it."""
    content = dict(content)
    if manifest:
        m = json.loads(content[MANIFEST])
        by_run: dict[str, dict] = {}
        for name, data in content.items():
            if name != MANIFEST:
                run, f = name.split("/")
                by_run.setdefault(run, {})[f] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        old = {e["name"]: e for e in m["runs"]}
        m["runs"] = [{**old.get(run, next(iter(old.values()))), "name": run, "files": fs} for run, fs in by_run.items()]
        content[MANIFEST] = json.dumps(m).encode()
    with tarfile.open(archive, "w") as tar:
        for name, data in content.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def assert_same_run(a: Run, b: Run) -> None:
    assert a.name == b.name and a.config == b.config and a.eval_config == b.eval_config
    assert (a.epochs, a.status) == (b.epochs, b.status)
    assert a.provenance == b.provenance and a.metrics() == b.metrics() and a.evals() == b.evals()


# -- round trip ----------------------------------------------------------------------------------
def test_round_trip_keeps_the_run_and_its_fp16_weights(source, tmp_path):
    archive = tmp_path / "runs.tar"
    manifest = export_runs([CONFIG.name], archive, root=source)
    src = Run(source / CONFIG.dir_name)
    entry = manifest["runs"][0]
    assert entry["name"] == CONFIG.dir_name and entry["key"] == CONFIG.key and entry["status"] == "complete"
    assert entry["provenance"] == src.provenance and manifest["lvae_format"] == 1
    assert CHECKPOINT not in entry["files"] and WEIGHTS_FP16 in entry["files"]  # the default leaves it out
    assert set(members(archive)) == {MANIFEST} | {f"{CONFIG.dir_name}/{f}" for f in entry["files"]}

    (imported,) = import_runs(archive, root=tmp_path / "dest")
    assert not imported.identical and imported.status == "complete" and imported.epochs == 2
    run = Run(tmp_path / "dest" / CONFIG.dir_name)
    assert_same_run(src, run)
    assert not (run.path / CHECKPOINT).exists()
    fp32 = src.load_model().state_dict()
    for k, v in run.load_model().state_dict().items():  # the fp16 weights, back in fp32
        assert torch.equal(v, fp32[k].half().to(v.dtype) if v.is_floating_point() else fp32[k]), k
    assert get_or_train(CONFIG, 2, ECONFIG, root=tmp_path / "dest", progress=False).path == run.path  # reused
    assert [p.name for p in (tmp_path / "dest").iterdir()] == [CONFIG.dir_name]  # no staging folder left


def test_with_checkpoint_carries_the_exact_weights_and_resumes(source, tmp_path):
    archive = tmp_path / "runs.tar.gz"
    export_runs([CONFIG.dir_name], archive, root=source, with_checkpoint=True)
    import_runs(archive, root=tmp_path / "dest")
    src, run = Run(source / CONFIG.dir_name), Run(tmp_path / "dest" / CONFIG.dir_name)
    assert (run.path / CHECKPOINT).read_bytes() == (src.path / CHECKPOINT).read_bytes()
    for k, v in run.load_model().state_dict().items():
        assert torch.equal(v, src.load_model().state_dict()[k]), k
    longer = get_or_train(CONFIG, 3, ECONFIG, root=tmp_path / "dest", progress=False)  # resumes from it
    assert longer.epochs == 3 and longer.status == "complete"


def test_round_trip_of_a_committed_run(tmp_path):
    shutil.copytree(ROOT / "results" / COMMITTED, tmp_path / "src" / COMMITTED)
    archive = tmp_path / "runs.tar"
    export_runs([COMMITTED], archive, root=tmp_path / "src")
    import_runs(archive, root=tmp_path / "dest")
    src, run = Run(tmp_path / "src" / COMMITTED), Run(tmp_path / "dest" / COMMITTED)
    assert_same_run(src, run)
    assert files(src.path) == files(run.path)
    a, b = src.per_image(), run.per_image()
    assert a["source"] == b["source"] and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
                                              for k in ("test_L1", "test_LK"))
    assert run.load_model() is not None


def test_importing_an_identical_run_again_is_a_no_op(source, tmp_path):
    archive = tmp_path / "runs.tar"
    export_runs([CONFIG.name], archive, root=source)
    import_runs(archive, root=tmp_path / "dest")
    before = files(tmp_path / "dest")
    (again,) = import_runs(archive, root=tmp_path / "dest")
    assert again.identical and again.status == "complete"
    assert files(tmp_path / "dest") == before


# -- refusals: each names the fix and leaves the destination as it was ----------------------------
@pytest.fixture
def archive(source, tmp_path) -> Path:
    export_runs([CONFIG.name], tmp_path / "runs.tar", root=source)
    return tmp_path / "runs.tar"


def refused(archive: Path, dest: Path, match: str, **kw) -> ArchiveError:
    before = files(dest)
    existed = dest.exists()
    with pytest.raises(ArchiveError, match=match) as err:
        import_runs(archive, root=dest, **kw)
    assert files(dest) == before and dest.exists() == existed  # nothing left behind, not even a folder
    if existed:
        assert not [p for p in dest.iterdir() if p.name.startswith(".lvae-import-")]
    return err.value


def test_a_damaged_archive_is_refused(archive, tmp_path):
    data = archive.read_bytes()
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file at all" * 100)
    refused(tmp_path / "garbage.tar", tmp_path / "dest", r"not a readable tar archive.*lvae runs export")
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    refused(tmp_path / "cut.tar", tmp_path / "dest", r"(not a readable tar|lacks|manifest).*export the runs again")
    refused(tmp_path / "missing.tar", tmp_path / "dest", r"is not a file")


def test_a_file_that_does_not_match_its_sha256_is_refused(archive, tmp_path):
    content = members(archive)
    name = f"{CONFIG.dir_name}/metrics.jsonl"
    content[name] = content[name].replace(b'"epoch": 2', b'"epoch": 3')
    write_tar(tmp_path / "bad.tar", content, manifest=False)
    refused(tmp_path / "bad.tar", tmp_path / "dest", r"metrics.jsonl does not match its SHA-256.*export the runs again")


def test_a_missing_or_unlisted_file_is_refused(archive, tmp_path):
    content = members(archive)
    write_tar(tmp_path / "missing.tar", {k: v for k, v in content.items() if not k.endswith("provenance.json")},
              manifest=False)
    refused(tmp_path / "missing.tar", tmp_path / "dest", r"lacks .*provenance.json, listed in its manifest")
    write_tar(tmp_path / "extra.tar", {**content, f"{CONFIG.dir_name}/notes.txt": b"hi"}, manifest=False)
    refused(tmp_path / "extra.tar", tmp_path / "dest", r"notes.txt, which its manifest does not list")
    write_tar(tmp_path / "nomanifest.tar", {k: v for k, v in content.items() if k != MANIFEST}, manifest=False)
    refused(tmp_path / "nomanifest.tar", tmp_path / "dest", r"has no manifest.json")


def test_a_config_that_does_not_hash_to_its_folder_name_is_refused(archive, tmp_path):
    content = members(archive)
    renamed = {k.replace(CONFIG.dir_name, "reg-0123456789"): v for k, v in content.items()}
    write_tar(tmp_path / "renamed.tar", renamed)
    refused(tmp_path / "renamed.tar", tmp_path / "dest", r"hashes to reg-[0-9a-f]{10}, not to its folder name")


def test_damaged_weights_are_refused_even_with_a_consistent_manifest(archive, tmp_path):
    content = members(archive)
    name = f"{CONFIG.dir_name}/{WEIGHTS_FP16}"
    obj = torch.load(io.BytesIO(content[name]), weights_only=True)
    next(iter(obj["model"].values())).add_(1)  # the file's own digest no longer matches
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_tar(tmp_path / "weights.tar", {**content, name: buf.getvalue()})
    refused(tmp_path / "weights.tar", tmp_path / "dest", r"damaged weights.*does not match its SHA-256 digest")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "deep", "folder"])
def test_unsafe_paths_are_refused(archive, tmp_path, kind):
    content = members(archive)
    bad = tmp_path / f"{kind}.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in content.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo({"dotdot": f"{CONFIG.dir_name}/../../evil", "absolute": str(tmp_path / "evil"),
                                "symlink": f"{CONFIG.dir_name}/link", "deep": f"{CONFIG.dir_name}/sub/evil",
                                "folder": f"{CONFIG.dir_name}/sub"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "folder":
            info.type = tarfile.DIRTYPE
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil") if info.isreg() else None)
    refused(bad, tmp_path / "dest", r"unsafe path .*import only archives that `lvae runs export` wrote")
    assert not (tmp_path / "evil").exists()


def test_a_local_run_with_other_contents_is_refused(archive, source, tmp_path):
    dest = tmp_path / "dest"
    shutil.copytree(source / CONFIG.dir_name, dest / CONFIG.dir_name)
    with open(dest / CONFIG.dir_name / "evals.jsonl", "w") as f:  # a local `lvae eval` the archive lacks: fine
        f.write("{}\n")
    (imported,) = import_runs(archive, root=dest)
    assert imported.identical
    (dest / CONFIG.dir_name / "metrics.jsonl").write_text("{}\n")
    refused(archive, dest, r"already exists in .* with other contents \(metrics.jsonl differ.*--out DIR")


def test_an_incomplete_run_is_refused_unless_allowed_and_nothing_of_the_archive_is_imported(source, tmp_path,
                                                                                             capsys):
    archive = tmp_path / "both.tar"
    assert cli.main(["runs", "export", CONFIG.name, PARTIAL.name, "-o", str(archive), "--out", str(source)]) == 0
    assert f"note: {PARTIAL.dir_name} is partial; importing it needs --allow-incomplete" in capsys.readouterr().out
    refused(archive, tmp_path / "dest", r"part-[0-9a-f]+ is partial \(1 of 2 epochs\).*--allow-incomplete")
    imported = import_runs(archive, root=tmp_path / "dest", allow_incomplete=True)
    assert [(r.name, r.status) for r in imported] == [(CONFIG.dir_name, "complete"), (PARTIAL.dir_name, "partial")]


def test_an_archive_of_another_format_is_refused(archive, tmp_path):
    content = members(archive)
    m = json.loads(content[MANIFEST])
    m["lvae_archive"] = 99
    write_tar(tmp_path / "future.tar", {**content, MANIFEST: json.dumps(m).encode()}, manifest=False)
    refused(tmp_path / "future.tar", tmp_path / "dest", r"archive format 99; this lvae .* reads format 1")


# -- export refusals ----------------------------------------------------------------------------
def test_export_refuses_a_run_in_training_or_without_the_checkpoint_asked_for(source, tmp_path):
    shutil.copytree(source / CONFIG.dir_name, tmp_path / "src" / CONFIG.dir_name,
                    ignore=shutil.ignore_patterns(CHECKPOINT))
    with pytest.raises(ArchiveError, match=r"has no checkpoint.pt to include.*without --with-checkpoint"):
        export_runs([CONFIG.name], tmp_path / "a.tar", root=tmp_path / "src", with_checkpoint=True)
    run = Run(tmp_path / "src" / CONFIG.dir_name)
    prov = run.provenance
    (run.path / "provenance.json").write_text(json.dumps({**prov, "status": "running"}))
    with run_lock(run.path):
        with pytest.raises(ArchiveError, match=r"is being trained .*wait for it to finish"):
            export_runs([CONFIG.name], tmp_path / "a.tar", root=tmp_path / "src")
    assert not list(tmp_path.glob("*a.tar*"))  # no archive, no temp file


# -- the command line ----------------------------------------------------------------------------
def test_cli_runs_export_and_import(source, tmp_path, capsys):
    archive = tmp_path / "runs.tar"
    assert cli.main(["runs", "export", CONFIG.name, "-o", str(archive), "--out", str(source)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {archive}: 1 run(s), ")
    assert cli.main(["runs", "import", str(archive), "--out", str(tmp_path / "dest")]) == 0
    assert f"imported {CONFIG.dir_name} (complete, 2 epochs)" in capsys.readouterr().out
    assert cli.main(["runs", "import", str(archive), "--out", str(tmp_path / "dest")]) == 0
    out = capsys.readouterr().out
    assert f"{CONFIG.dir_name}: already in" in out and "identical files" in out and "nothing to do" in out
    assert cli.main(["runs", "--out", str(tmp_path / "dest"), "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == [CONFIG.dir_name]
    (tmp_path / "bad.tar").write_bytes(b"x" * 1000)
    assert cli.main(["runs", "import", str(tmp_path / "bad.tar"), "--out", str(tmp_path / "dest")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lvae runs: error: ") and "lvae runs export" in err and len(err.strip().splitlines()) == 1
