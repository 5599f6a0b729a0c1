"""Chapter helpers of lvae.analysis / lvae.book that pick or print the numbers the book shows."""
import pytest

from lvae.analysis import best_lk, registry_rows, short_device
from lvae.book import BookError, glue


class FakeRun:
    def __init__(self, metrics, evals, epochs=10, ok=True):
        self._m, self._e, self.epochs, self.ok = metrics, evals, epochs, ok

    def metrics(self):
        return self._m

    def evals(self):
        return self._e


TRAINING = [{"epoch": 10, "test_LK": -90.0, "test_LK_se": 1.0, "iw_k": 5000, "n_iw": 500, "iw_seconds": 30.0}]


def _eval(value, n, seconds, device="cpu (x86_64, 2 threads)", epoch=10, k=5000):
    return {"epoch": epoch, "test_LK": value, "test_LK_se": 0.2, "iw_k": k, "n_iw": n, "iw_seconds": seconds,
            "device": device}


def test_best_lk_takes_most_images_then_newest():
    run = FakeRun(TRAINING, [_eval(-90.5, 10_000, 758.0), _eval(-90.5, 10_000, 674.0), _eval(-91.0, 1000, 60.0)])
    lk = best_lk(run)
    assert (lk["n"], lk["seconds"], lk["source"]) == (10_000, 674.0, "lvae eval on cpu, 2 threads")
    # exactly n images when asked (to compare two models on the same images); else the training-time value
    assert best_lk(run, 1000)["value"] == -91.0
    assert best_lk(run, 77)["source"] == "training-time evaluation"


def test_best_lk_ignores_other_weights_and_other_k():
    run = FakeRun(TRAINING, [_eval(-80.0, 10_000, 1.0, epoch=9), _eval(-80.0, 10_000, 1.0, k=50)])
    assert best_lk(run)["value"] == -90.0
    assert best_lk(FakeRun(TRAINING, [], ok=False)) is None
    assert best_lk(FakeRun([{"epoch": 10, "test_L1": -99.0}], [])) is None


def test_short_device():
    assert short_device("cpu (x86_64, 1 threads)") == "cpu, 1 thread"
    assert short_device("cpu (x86_64, 16 threads)") == "cpu, 16 threads"
    assert short_device("NVIDIA H100 80GB HBM3") == "NVIDIA H100 80GB HBM3"
    assert short_device(None) is None


def test_glue_refuses_text_that_would_print_as_a_tuple():
    with pytest.raises(BookError, match=r"\(10, 0\).*n_iw:,"):
        glue("n_iw", "10,000")
    glue("word", "holds")  # plain words and numbers are fine
    glue("n", 10_000)


def test_registry_rows_mark_unfinished_runs(tmp_path):
    from lvae.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
    from lvae.runs import get_or_train

    assert registry_rows(tmp_path) == []
    cfg = RunConfig(name="tiny", model=ModelConfig(x_dim=64, latent_sizes=(4, 2), hidden_sizes=(16, 8)),
                    train=TrainConfig(dataset="synthetic", subset=64, batch_size=32))
    ev = EvalConfig(every=1, iw_samples=5, iw_chunk=5, test_subset=20, train_subset=32)
    get_or_train(cfg, 2, ev, root=tmp_path, device="cpu", progress=False, stop_after=1)
    [row] = registry_rows(tmp_path)
    assert row["epochs"] == "1 (partial)" and row["device"].startswith("cpu, ") and len(row["commit"]) <= 7
    get_or_train(cfg, 2, ev, root=tmp_path, device="cpu", progress=False)
    [row] = registry_rows(tmp_path)
    assert row["epochs"] == 2 and row["test L1"] is not None
