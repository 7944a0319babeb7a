"""Fashion-MNIST loading and batching shared by the PyTorch and JAX/Flax code.

Every implementation gets the very same numpy arrays and the very same batches
from here, so any difference between them comes from batch normalization, not from
the input pipeline.

Where the data is looked for (the first place holding all four files wins):

1. the ``data_dir`` argument (the ``--data-dir`` option),
2. the ``FASHION_MNIST_DIR`` environment variable,
3. ``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``),
4. the per-user cache ``$XDG_CACHE_HOME/batchnorm-compare/fashion-mnist``
   (``~/.cache/...`` when XDG_CACHE_HOME is unset),
5. a download from the mirrors torchvision uses, into that cache.

A directory named explicitly (1 or 2) that lacks the files is an error, not a
silent fall-back: the user asked for that data and should learn it is not there.
Each of the four files may be stored as ``NAME.gz`` or decompressed as ``NAME``.

Files are verified by the MD5 of their *decompressed* content rather than of
the ``.gz`` archive: Debian re-compressed the archives, so their bytes (and
archive MD5s) differ from upstream although the content is identical, and a
decompressed copy has no archive to check at all.

Verification order, and so which error wins when a file has several problems:
gzip decompression, IDX magic number, item dimensions, file size against the
header's item count, item count against the expected count, label range, and
last the MD5. The structural checks come first so the message says *what* is
wrong; the MD5 comes last and catches everything else (e.g. changed pixels).
"""

import functools
import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

# File name -> (number of items, MD5 of the decompressed content).
# Tests replace this table to load tiny datasets; an MD5 of None skips that check.
EXPECTED = {
    TRAIN_IMAGES: (60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    TRAIN_LABELS: (60000, "9018921c3c673c538a1fc5bad174d6f9"),
    TEST_IMAGES: (10000, "8181f5470baa50b63fa0f6fddb340f0a"),
    TEST_LABELS: (10000, "15d484375f8d13e6eb1aabb0c3f46965"),
}

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = "sudo apt-get install dataset-fashion-mnist"

# The same mirrors, in the same order, as torchvision's FashionMNIST.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
DOWNLOAD_TIMEOUT_S = 30

IMAGE_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension
IMAGE_SIZE = 28
NUM_CLASSES = 10

LAYOUTS = ("NCHW", "NHWC")

REPAIR_HINT = (
    "Replace it with a good copy: delete it if it is in the download cache "
    "(it is then downloaded again), or reinstall dataset-fashion-mnist."
)


class DataError(Exception):
    """The Fashion-MNIST data is missing, damaged or could not be downloaded."""


def cache_dir() -> Path:
    """Per-user download cache; reads XDG_CACHE_HOME at call time."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchnorm-compare" / "fashion-mnist"


# ---------------------------------------------------------------------------
# Reading and checking single IDX files
# ---------------------------------------------------------------------------


def _read_content(path: Path, gzipped: bool) -> bytes:
    """The file's (decompressed) bytes; any I/O or gzip problem becomes a DataError."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"Cannot read {path}: {error}") from error
    if not gzipped:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        # BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise DataError(
            f"{path} is not a valid gzip file (truncated or corrupt: {error}). {REPAIR_HINT}"
        ) from error


def _parse_idx(content: bytes, path: Path, magic: int, item_shape: tuple) -> np.ndarray:
    """Check an IDX header against what is expected and return the items as uint8."""
    if len(content) < 4:
        raise DataError(f"{path} is too short ({len(content)} bytes) to be an IDX file. {REPAIR_HINT}")
    found_magic = int(np.frombuffer(content, dtype=">i4", count=1)[0])
    if found_magic != magic:
        raise DataError(
            f"{path} has the wrong magic number {found_magic} (expected {magic}); "
            f"it is not the IDX file it should be. {REPAIR_HINT}"
        )
    header_bytes = 4 * (2 + len(item_shape))  # magic, item count, one int per dimension
    if len(content) < header_bytes:
        raise DataError(f"{path} ends inside its IDX header ({len(content)} bytes). {REPAIR_HINT}")
    header = np.frombuffer(content, dtype=">i4", count=2 + len(item_shape))
    count = int(header[1])
    dimensions = tuple(int(size) for size in header[2:])
    if dimensions != item_shape:
        raise DataError(
            f"{path} has items of wrong dimensions {dimensions} (expected {item_shape}). {REPAIR_HINT}"
        )
    expected_bytes = header_bytes + count * int(np.prod(item_shape, dtype=np.int64))
    if len(content) != expected_bytes:
        raise DataError(
            f"{path} has the wrong size: its header announces {count} items, so expected "
            f"{expected_bytes} bytes, but it has {len(content)} bytes. {REPAIR_HINT}"
        )
    # np.frombuffer gives a read-only view of the bytes: no copy.
    return np.frombuffer(content, dtype=np.uint8, offset=header_bytes).reshape(count, *item_shape)


def _check_count(items: np.ndarray, path: Path, expected_count: int | None) -> None:
    if expected_count is not None and len(items) != expected_count:
        raise DataError(
            f"{path} holds {len(items)} items, expected {expected_count}; "
            f"is it the right file? {REPAIR_HINT}"
        )


def _check_md5(content: bytes, path: Path, expected_md5: str | None) -> None:
    if expected_md5 is None:
        return
    got = hashlib.md5(content, usedforsecurity=False).hexdigest()
    if got != expected_md5:
        raise DataError(
            f"{path} failed its checksum: MD5 of the decompressed content is {got}, "
            f"expected {expected_md5}. {REPAIR_HINT}"
        )


def _read_images(path: Path, gzipped: bool, expected_count=None, expected_md5=None) -> np.ndarray:
    content = _read_content(path, gzipped)
    images = _parse_idx(content, path, IMAGE_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
    _check_count(images, path, expected_count)
    _check_md5(content, path, expected_md5)
    return images


def _read_labels(path: Path, gzipped: bool, expected_count=None, expected_md5=None) -> np.ndarray:
    content = _read_content(path, gzipped)
    labels = _parse_idx(content, path, LABEL_MAGIC, ())
    _check_count(labels, path, expected_count)
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(
            f"{path} has label {labels[bad]} at index {bad}; labels must be in "
            f"0..{NUM_CLASSES - 1}. {REPAIR_HINT}"
        )
    _check_md5(content, path, expected_md5)
    # int64 like torchvision's targets (and what cross-entropy losses expect).
    return labels.astype(np.int64)


def read_idx_images(path, expected_count=None, expected_md5=None) -> np.ndarray:
    """Read an IDX image file (gzipped if the name ends in .gz) as read-only uint8 (N, 28, 28)."""
    path = Path(path)
    return _read_images(path, path.suffix == ".gz", expected_count, expected_md5)


def read_idx_labels(path, expected_count=None, expected_md5=None) -> np.ndarray:
    """Read an IDX label file (gzipped if the name ends in .gz) as int64 (N,)."""
    path = Path(path)
    return _read_labels(path, path.suffix == ".gz", expected_count, expected_md5)


def _verify_file(name: str, path: Path, gzipped: bool) -> np.ndarray:
    """Read one of the four dataset files, checking it against EXPECTED."""
    count, md5 = EXPECTED[name]
    reader = _read_images if "images" in name else _read_labels
    return reader(path, gzipped, count, md5)


# ---------------------------------------------------------------------------
# Finding the data
# ---------------------------------------------------------------------------


def _find_file(directory: Path, name: str) -> Path | None:
    """NAME or NAME.gz in directory; the decompressed one wins as it is faster to read."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(directory: Path) -> list[str]:
    return [name for name in EXPECTED if _find_file(directory, name) is None]


def _describe_missing(directory: Path) -> str:
    if not directory.exists():
        return "does not exist"
    if not directory.is_dir():
        return "is not a directory"
    missing = ", ".join(f"{name}[.gz]" for name in _missing_files(directory))
    return f"lacks {missing}"


def _explicit_dir(directory: Path, source: str) -> Path:
    """A directory the user named: it must hold the data, no falling back elsewhere."""
    if directory.is_dir() and not _missing_files(directory):
        return directory
    raise DataError(
        f"{source} points to {directory}, which {_describe_missing(directory)}. "
        f"Put the four Fashion-MNIST files there (each as NAME or NAME.gz: "
        f"{', '.join(EXPECTED)}), or leave {source} unset to use {DEBIAN_DIR} "
        f"(install it with: {APT_COMMAND}), the cache {cache_dir()} or a download."
    )


def find_data_dir(data_dir=None) -> Path:
    """The directory to load from, following the search order in the module docstring."""
    if data_dir is not None:
        return _explicit_dir(Path(data_dir), "data_dir (--data-dir)")
    from_env = os.environ.get("FASHION_MNIST_DIR")
    if from_env:  # an empty value counts as unset
        return _explicit_dir(Path(from_env), "FASHION_MNIST_DIR")

    cache = cache_dir()
    looked = []
    for directory in (Path(DEBIAN_DIR), cache):
        if directory.is_dir() and not _missing_files(directory):
            return directory
        looked.append(f"  {directory}: {_describe_missing(directory)}")

    try:
        download(cache)
    except DataError as error:
        raise DataError(
            "Fashion-MNIST was not found. Looked in:\n"
            + "\n".join(looked)
            + f"\nand the download into {cache} failed:\n  {error}\n"
            f"Install it with:\n  {APT_COMMAND}\n"
            "or point --data-dir or FASHION_MNIST_DIR at a directory holding the four files "
            f"(each as NAME or NAME.gz): {', '.join(EXPECTED)}."
        ) from error
    return cache


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------


def _fetch(url: str, out) -> None:
    """Copy url into the open file out, with a progress bar on a terminal."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        # disable=None: the bar only shows on a terminal, not in logs.
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=None, leave=False) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client does not complain when the connection closes early; we must.
    if total is not None and received != total:
        raise DataError(f"download of {url} stopped after {received} of {total} bytes")


def _download_verified(url: str, name: str, directory: Path) -> None:
    """Download url as directory/NAME.gz, which appears only once it is verified.

    The bytes go to a hidden temporary file in the same directory, are verified,
    and only then renamed into place (atomic within one file system), so a failed
    or interrupted download never leaves a file that looks like data, and two
    processes downloading at once cannot see each other's half-written files.
    """
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.gz.", suffix=".part")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out)
        _verify_file(name, temp, gzipped=True)
        os.replace(temp, directory / f"{name}.gz")
    finally:
        temp.unlink(missing_ok=True)


def _download_file(name: str, directory: Path) -> None:
    """Download NAME.gz into directory from the first mirror that gives a valid file."""
    failures = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            _download_verified(url, name, directory)
            return
        except (OSError, http.client.HTTPException, ValueError, DataError) as error:
            # OSError covers URLError, timeouts and disk errors; ValueError a bad URL.
            failures.append(f"{url}: {error}")
    if not MIRRORS:
        failures.append("no download mirrors are configured")
    raise DataError(f"could not download {name}.gz: " + "; ".join(failures))


def download(directory=None) -> Path:
    """Download the files missing from directory (default: cache_dir()) and return it."""
    directory = Path(directory) if directory is not None else cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the download directory {directory}: {error}") from error
    for name in _missing_files(directory):
        _download_file(name, directory)
    return directory


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _to_float_images(raw: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], exactly like ToTensor."""
    images = raw.reshape(len(raw), 1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
    # In place: bit-identical to astype(np.float32) / 255 (the same float32
    # division as ToTensor) but without allocating a second 188 MB array.
    images /= 255
    return images


# One entry only: a loaded dataset is about 220 MB and a process uses one.
@functools.lru_cache(maxsize=1)
def _load_files(files: tuple) -> tuple:
    """Load and verify files, a tuple of (name, path, gzipped, size, mtime) entries.

    Size and mtime are only part of the cache key, so a replaced file is re-read.
    """
    arrays = {}
    for name, path, gzipped, _size, _mtime in files:
        data = _verify_file(name, Path(path), gzipped)
        arrays[name] = _to_float_images(data) if "images" in name else data
    result = (arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS], arrays[TEST_IMAGES], arrays[TEST_LABELS])
    for array in result:
        # The same arrays go to every caller: nobody may change them for the next one.
        array.flags.writeable = False
    return result


def load_fashion_mnist(data_dir=None):
    """Return read-only (train_images, train_labels, test_images, test_labels).

    Images are float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,); N is 60000
    for train and 10000 for test. Repeated calls return the cached arrays.
    """
    directory = find_data_dir(data_dir).resolve()
    files = []
    for name in EXPECTED:
        path = _find_file(directory, name)
        stat = path.stat()
        files.append((name, str(path), path.suffix == ".gz", stat.st_size, stat.st_mtime_ns))
    return _load_files(tuple(files))


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def _check_batch_size(batch_size) -> None:
    # bool is an int subclass, but batch_size=True is surely a mistake.
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """Images (N, 1, 28, 28) in the given layout: NCHW as is, NHWC as (N, 28, 28, 1)."""
    _check_layout(layout)
    if layout == "NCHW":
        return images
    # With one channel this is a reshape in disguise: no copy is needed to be C-contiguous.
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in the given epoch; fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last, partial batch counts (like drop_last=False)."""
    _check_batch_size(batch_size)
    return (num_examples + batch_size - 1) // batch_size


def _batches(images, labels, order, batch_size, layout):
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield to_layout(images[index], layout), labels[index]


def _check_batch_args(images, labels, batch_size, layout) -> None:
    # Checked when the batches are asked for, not at the first next().
    _check_batch_size(batch_size)
    _check_layout(layout)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")


def train_batch_indices(num_examples, batch_size, seed, epoch):
    """The example indices of each training batch of an epoch, in order: what train_batches
    gathers. The fast paths gather the very same batches on a device from these."""
    _check_batch_size(batch_size)
    order = epoch_permutation(seed, epoch, num_examples)
    return [order[start:start + batch_size] for start in range(0, num_examples, batch_size)]


def train_batches(images, labels, batch_size, seed, epoch, layout="NCHW"):
    """Yield (images, labels) batches in epoch_permutation(seed, epoch, N) order."""
    _check_batch_args(images, labels, batch_size, layout)
    order = epoch_permutation(seed, epoch, len(images))
    return _batches(images, labels, order, batch_size, layout)


def test_batches(images, labels, batch_size, layout="NCHW"):
    """Yield (images, labels) batches in dataset order."""
    _check_batch_args(images, labels, batch_size, layout)
    return _batches(images, labels, np.arange(len(images)), batch_size, layout)


# Its name starts with "test": keep pytest from collecting it where it is imported.
test_batches.__test__ = False


# ---------------------------------------------------------------------------
# Shards: a global batch split over the workers of a data-parallel run
# ---------------------------------------------------------------------------


def shard_bounds(batch_size: int, workers: int) -> list:
    """(start, stop) of each worker's rows in a global batch: contiguous, in worker order, sizes
    differing by at most one (the first batch_size % workers workers take one more), as
    numpy.array_split cuts. Every framework's workers take the same rows."""
    _check_batch_size(batch_size)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers <= 0:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if workers > batch_size:
        raise ValueError(f"a batch of {batch_size} examples cannot be shared by {workers} workers")
    sizes = [batch_size // workers + (worker < batch_size % workers) for worker in range(workers)]
    stops = np.cumsum(sizes).tolist()
    return [(stop - size, stop) for size, stop in zip(sizes, stops)]
