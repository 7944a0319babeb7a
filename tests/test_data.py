"""Tests for common/data.py.

Tiny IDX files written here exercise parsing, every error path, the search
order and downloads (from file:// and loopback HTTP mirrors, never the
internet). The real data tests read the Debian package's files and compare
them with torchvision; they fail, rather than skip, when it is not installed.
"""

import gzip
import hashlib
import http.server
import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common import data
from common.data import DataError

# Captured before the autouse fixture points DEBIAN_DIR elsewhere.
REAL_DIR = data.DEBIAN_DIR

TINY_COUNTS = {
    data.TRAIN_IMAGES: 5,
    data.TRAIN_LABELS: 5,
    data.TEST_IMAGES: 3,
    data.TEST_LABELS: 3,
}


# ---------------------------------------------------------------------------
# Helpers: writing tiny IDX datasets
# ---------------------------------------------------------------------------


def images_idx(images, magic=2051) -> bytes:
    images = np.asarray(images, dtype=np.uint8)
    return struct.pack(">iiii", magic, len(images), *images.shape[1:]) + images.tobytes()


def labels_idx(labels, magic=2049) -> bytes:
    labels = np.asarray(labels, dtype=np.uint8)
    return struct.pack(">ii", magic, len(labels)) + labels.tobytes()


def write_file(path: Path, content: bytes, gz: bool) -> Path:
    """Write content to path, or gzipped to path.gz; return the path written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def tiny_contents(marker: int = 1) -> dict:
    """Decompressed content of a tiny dataset; the first train pixel is marker."""
    rng = np.random.default_rng(marker)
    contents = {}
    for images_name, labels_name in ((data.TRAIN_IMAGES, data.TRAIN_LABELS), (data.TEST_IMAGES, data.TEST_LABELS)):
        count = TINY_COUNTS[images_name]
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = marker
        contents[images_name] = images_idx(images)
        contents[labels_name] = labels_idx(rng.integers(0, 10, count))
    return contents


def write_dataset(directory: Path, contents: dict, gz: bool = True) -> None:
    for name, content in contents.items():
        write_file(directory / name, content, gz)


def use_tiny_table(monkeypatch, contents=None) -> None:
    """Make the loader expect tiny files: their MD5s, or no MD5 check if contents is None."""
    table = {
        name: (count, None if contents is None else hashlib.md5(contents[name]).hexdigest())
        for name, count in TINY_COUNTS.items()
    }
    monkeypatch.setattr(data, "EXPECTED", table)


def marker_of(train_images) -> int:
    return round(float(train_images[0, 0, 0, 0]) * 255)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the real Debian dir, the user's cache, the network or another test's cache."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(data, "MIRRORS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    data._load_files.cache_clear()
    yield
    data._load_files.cache_clear()


# ---------------------------------------------------------------------------
# Parsing tiny files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gives_file_values(tmp_path, gz):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    labels = [3, 9]
    images_path = write_file(tmp_path / "images", images_idx(images), gz)
    labels_path = write_file(tmp_path / "labels", labels_idx(labels), gz)

    read_images = data.read_idx_images(images_path)
    read_labels = data.read_idx_labels(labels_path)

    assert read_images.dtype == np.uint8 and read_images.shape == (2, 28, 28)
    assert np.array_equal(read_images, images)
    assert read_labels.dtype == np.int64 and read_labels.shape == (2,)
    assert read_labels.tolist() == labels


def test_load_tiny_dataset(tmp_path, monkeypatch):
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    write_dataset(tmp_path / "d", contents)

    train_images, train_labels, test_images, test_labels = data.load_fashion_mnist(tmp_path / "d")

    raw = data.read_idx_images(tmp_path / "d" / f"{data.TRAIN_IMAGES}.gz")
    assert train_images.dtype == np.float32 and train_images.shape == (5, 1, 28, 28)
    assert np.array_equal(train_images[:, 0], raw.astype(np.float32) / 255)
    assert test_images.shape == (3, 1, 28, 28)
    assert train_labels.dtype == np.int64 and train_labels.shape == (5,)
    assert np.array_equal(test_labels, data.read_idx_labels(tmp_path / "d" / f"{data.TEST_LABELS}.gz"))
    # Cached arrays are shared, so they must be read-only.
    with pytest.raises(ValueError):
        train_images[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError):
        train_labels[0] = 1


def test_load_accepts_mixed_gz_and_decompressed_files(tmp_path, monkeypatch):
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    for i, (name, content) in enumerate(contents.items()):
        write_file(tmp_path / name, content, gz=i % 2 == 0)

    train_images, train_labels, *_ = data.load_fashion_mnist(tmp_path)

    assert train_images.shape == (5, 1, 28, 28) and train_labels.shape == (5,)


def test_changed_file_is_reloaded_not_served_from_cache(tmp_path, monkeypatch):
    use_tiny_table(monkeypatch)  # no MD5: two different datasets in turn
    write_dataset(tmp_path, tiny_contents(marker=1))
    assert marker_of(data.load_fashion_mnist(tmp_path)[0]) == 1

    write_dataset(tmp_path, tiny_contents(marker=2))
    # Different content of the same size: make sure the mtime differs too.
    path = tmp_path / f"{data.TRAIN_IMAGES}.gz"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    assert marker_of(data.load_fashion_mnist(tmp_path)[0]) == 2


# ---------------------------------------------------------------------------
# Error paths of single files (the messages are pinned)
# ---------------------------------------------------------------------------


def test_truncated_gzip(tmp_path):
    path = write_file(tmp_path / "images", images_idx(np.zeros((2, 28, 28))), gz=True)
    path.write_bytes(path.read_bytes()[:-20])

    with pytest.raises(DataError, match=rf"{re.escape(str(path))} is not a valid gzip file \(truncated or corrupt"):
        data.read_idx_images(path)


@pytest.mark.parametrize("damage", ["not gzip", "flipped byte"])
def test_corrupt_gzip(tmp_path, damage):
    path = write_file(tmp_path / "labels", labels_idx(np.arange(200) % 10), gz=True)
    if damage == "not gzip":
        path.write_bytes(b"this is not gzip data at all")
    else:
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))

    with pytest.raises(DataError, match=rf"{re.escape(str(path))} is not a valid gzip file"):
        data.read_idx_labels(path)


def test_wrong_magic(tmp_path):
    path = write_file(tmp_path / "labels-not-images", labels_idx([1, 2]), gz=False)

    with pytest.raises(DataError, match=r"labels-not-images has the wrong magic number 2049 \(expected 2051\)"):
        data.read_idx_images(path)


def test_wrong_dimensions(tmp_path):
    path = write_file(tmp_path / "images", images_idx(np.zeros((2, 27, 28))), gz=True)

    with pytest.raises(DataError, match=r"has items of wrong dimensions \(27, 28\) \(expected \(28, 28\)\)"):
        data.read_idx_images(path)


@pytest.mark.parametrize("actual_images", [4, 6])
def test_wrong_size(tmp_path, actual_images):
    # The header claims 5 images, the file holds fewer or more bytes than that.
    content = struct.pack(">iiii", 2051, 5, 28, 28) + bytes(actual_images * 784)
    path = write_file(tmp_path / "images", content, gz=True)

    expected = 16 + 5 * 784
    actual = 16 + actual_images * 784
    with pytest.raises(
        DataError,
        match=rf"wrong size: its header announces 5 items, so expected {expected} bytes, but it has {actual} bytes",
    ):
        data.read_idx_images(path)


def test_header_cut_short(tmp_path):
    path = write_file(tmp_path / "images", struct.pack(">ii", 2051, 5), gz=False)

    with pytest.raises(DataError, match="ends inside its IDX header"):
        data.read_idx_images(path)


def test_label_out_of_range(tmp_path):
    path = write_file(tmp_path / "labels", labels_idx([0, 9, 10, 3]), gz=True)

    with pytest.raises(DataError, match=r"has label 10 at index 2; labels must be in 0\.\.9"):
        data.read_idx_labels(path)


def test_wrong_count(tmp_path):
    path = write_file(tmp_path / "labels", labels_idx([1, 2, 3]), gz=True)

    with pytest.raises(DataError, match="holds 3 items, expected 4"):
        data.read_idx_labels(path, expected_count=4)


def test_checksum_mismatch(tmp_path):
    content = images_idx(np.ones((2, 28, 28)))
    path = write_file(tmp_path / "images", content, gz=True)
    got = hashlib.md5(content).hexdigest()

    expected = rf"failed its checksum: MD5 of the decompressed content is {got}, expected 0{{32}}"
    with pytest.raises(DataError, match=expected):
        data.read_idx_images(path, expected_md5="0" * 32)
    # The right content MD5 passes, although the .gz archive's bytes have another MD5.
    assert data.read_idx_images(path, expected_md5=got).shape == (2, 28, 28)


def test_structural_errors_win_over_count_and_checksum(tmp_path):
    path = write_file(tmp_path / "images", labels_idx([1, 2]), gz=True)
    with pytest.raises(DataError, match="wrong magic number"):
        data.read_idx_images(path, expected_count=7, expected_md5="0" * 32)

    path = write_file(tmp_path / "labels", labels_idx([1, 12]), gz=True)
    with pytest.raises(DataError, match="holds 2 items, expected 7"):
        data.read_idx_labels(path, expected_count=7, expected_md5="0" * 32)
    with pytest.raises(DataError, match="has label 12"):
        data.read_idx_labels(path, expected_count=2, expected_md5="0" * 32)


def test_load_checks_files_against_the_real_table(tmp_path):
    # Tiny files are valid IDX but not Fashion-MNIST: the real counts reject them.
    write_dataset(tmp_path, tiny_contents())

    with pytest.raises(DataError, match=rf"{data.TRAIN_IMAGES}\.gz holds 5 items, expected 60000"):
        data.load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------------------
# Finding the data
# ---------------------------------------------------------------------------


def test_nothing_found_lists_every_place_and_the_install_command(tmp_path):
    with pytest.raises(DataError) as error:
        data.load_fashion_mnist()

    message = str(error.value)
    assert f"{tmp_path / 'debian'}: does not exist" in message
    assert f"{tmp_path / 'xdg' / 'batchnorm-compare' / 'fashion-mnist'}: does not exist" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "FASHION_MNIST_DIR" in message


def test_incomplete_directory_names_the_missing_files(tmp_path, monkeypatch):
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    debian = tmp_path / "debian"
    write_dataset(debian, {name: contents[name] for name in (data.TRAIN_IMAGES, data.TRAIN_LABELS)})

    expected = rf"{re.escape(str(debian))}: lacks t10k-images-idx3-ubyte\[\.gz\], t10k-labels-idx1-ubyte\[\.gz\]"
    with pytest.raises(DataError, match=expected):
        data.load_fashion_mnist()


@pytest.mark.parametrize("how", ["argument", "environment"])
@pytest.mark.parametrize("state", ["missing", "incomplete"])
def test_explicit_directory_without_data_is_an_error_not_a_fallback(tmp_path, monkeypatch, how, state):
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    write_dataset(tmp_path / "debian", contents)  # a fallback that must not be used
    explicit = tmp_path / "explicit"
    if state == "incomplete":
        write_dataset(explicit, {data.TRAIN_IMAGES: contents[data.TRAIN_IMAGES]})
    if how == "environment":
        monkeypatch.setenv("FASHION_MNIST_DIR", str(explicit))

    expected = "does not exist" if state == "missing" else r"lacks train-labels-idx1-ubyte\[\.gz\]"
    source = "data_dir" if how == "argument" else "FASHION_MNIST_DIR"
    with pytest.raises(DataError, match=rf"{source}.* points to {re.escape(str(explicit))}, which {expected}"):
        data.load_fashion_mnist(explicit if how == "argument" else None)


SEARCH_ORDER = ["argument", "environment", "debian", "cache", "mirror"]


@pytest.mark.parametrize("first", range(len(SEARCH_ORDER)), ids=SEARCH_ORDER)
def test_search_order(tmp_path, monkeypatch, first):
    """Every place from `first` on has data; the one at `first` must be read."""
    use_tiny_table(monkeypatch)  # each place holds different content: skip the MD5
    places = {place: tmp_path / place for place in SEARCH_ORDER}
    places["debian"] = data.DEBIAN_DIR
    places["cache"] = data.cache_dir()
    monkeypatch.setattr(data, "MIRRORS", (places["mirror"].as_uri() + "/",))
    for marker, place in enumerate(SEARCH_ORDER[first:], start=first + 1):
        write_dataset(places[place], tiny_contents(marker))
    if first <= SEARCH_ORDER.index("environment"):
        monkeypatch.setenv("FASHION_MNIST_DIR", str(places["environment"]))

    train_images = data.load_fashion_mnist(places["argument"] if first == 0 else None)[0]

    assert marker_of(train_images) == first + 1


# ---------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------


def cache_listing() -> list[str]:
    cache = data.cache_dir()
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


def test_download_lands_verified_files_in_the_cache(tmp_path, monkeypatch):
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    write_dataset(tmp_path / "mirror", contents)
    monkeypatch.setattr(data, "MIRRORS", ((tmp_path / "mirror").as_uri() + "/",))

    train_images, *_ = data.load_fashion_mnist()

    assert marker_of(train_images) == 1
    assert cache_listing() == sorted(f"{name}.gz" for name in contents)  # no temporary files left
    # The cache is now found without the mirror.
    monkeypatch.setattr(data, "MIRRORS", ())
    data._load_files.cache_clear()
    assert marker_of(data.load_fashion_mnist()[0]) == 1


def truncate_gz(content: bytes) -> bytes:
    compressed = gzip.compress(content)
    return compressed[: len(compressed) // 2]


@pytest.mark.parametrize("damage", ["truncated gzip", "checksum mismatch"])
def test_bad_download_leaves_nothing_that_looks_valid(tmp_path, monkeypatch, damage):
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    mirror = tmp_path / "mirror"
    write_dataset(mirror, contents)
    bad = mirror / f"{data.TEST_IMAGES}.gz"
    if damage == "truncated gzip":
        bad.write_bytes(truncate_gz(contents[data.TEST_IMAGES]))
        reason = "is not a valid gzip file"
    else:
        bad.write_bytes(gzip.compress(tiny_contents(marker=7)[data.TEST_IMAGES]))
        reason = "failed its checksum"
    monkeypatch.setattr(data, "MIRRORS", (mirror.as_uri() + "/",))

    with pytest.raises(DataError) as error:
        data.load_fashion_mnist()

    message = str(error.value)
    assert f"could not download {data.TEST_IMAGES}.gz" in message and reason in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    listing = cache_listing()
    assert not any(name.startswith(data.TEST_IMAGES) for name in listing)
    assert not any(name.startswith(".") for name in listing), listing  # no temporary files

    # Once the mirror is fixed, the next run downloads what is missing and loads.
    write_file(mirror / data.TEST_IMAGES, contents[data.TEST_IMAGES], gz=True)
    test_images = data.load_fashion_mnist()[2]
    assert test_images.shape == (3, 1, 28, 28)


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves self.server.files: URL path -> (body, Content-Length to announce)."""

    def do_GET(self):
        body, announced = self.server.files.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # keep the test output clean


@pytest.fixture
def http_mirror(monkeypatch):
    """A loopback HTTP server; returns (server, base URL). Set server.files to serve."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # in case a proxy is configured
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    server.files = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/fashion-mnist/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_first_mirror_failing_second_good(tmp_path, monkeypatch, http_mirror):
    server, url = http_mirror  # serves nothing: 404 for every file
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    write_dataset(tmp_path / "mirror", contents)
    monkeypatch.setattr(data, "MIRRORS", (url, (tmp_path / "mirror").as_uri() + "/"))

    assert marker_of(data.load_fashion_mnist()[0]) == 1
    assert cache_listing() == sorted(f"{name}.gz" for name in contents)


def test_http_download_and_cut_connection(monkeypatch, http_mirror):
    server, url = http_mirror
    contents = tiny_contents()
    use_tiny_table(monkeypatch, contents)
    for name, content in contents.items():
        body = gzip.compress(content)
        server.files[f"/fashion-mnist/{name}.gz"] = (body, len(body))
    monkeypatch.setattr(data, "MIRRORS", (url,))
    # The connection closes after half the train labels although all was announced.
    full = gzip.compress(contents[data.TRAIN_LABELS])
    server.files[f"/fashion-mnist/{data.TRAIN_LABELS}.gz"] = (full[:20], len(full))

    with pytest.raises(DataError, match=rf"stopped after 20 of {len(full)} bytes"):
        data.load_fashion_mnist()
    assert cache_listing() == [f"{data.TRAIN_IMAGES}.gz"]  # verified before the failure

    server.files[f"/fashion-mnist/{data.TRAIN_LABELS}.gz"] = (full, len(full))
    assert marker_of(data.load_fashion_mnist()[0]) == 1


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def numbered_examples(count: int):
    """Images whose pixels all hold their index, and labels equal to the index."""
    images = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None, None], (count, 1, 28, 28)).copy()
    return images, np.arange(count, dtype=np.int64)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "256", None])
def test_bad_batch_size(batch_size):
    images, labels = numbered_examples(4)
    expected = re.escape(f"batch_size must be a positive integer, got {batch_size!r}")
    # Raised at the call, before any batch is asked for.
    with pytest.raises(ValueError, match=expected):
        data.train_batches(images, labels, batch_size, seed=0, epoch=0)
    with pytest.raises(ValueError, match=expected):
        data.test_batches(images, labels, batch_size)
    with pytest.raises(ValueError, match=expected):
        data.num_batches(4, batch_size)


def test_bad_layout_and_mismatched_lengths():
    images, labels = numbered_examples(4)
    with pytest.raises(ValueError, match="layout must be one of"):
        data.train_batches(images, labels, 2, seed=0, epoch=0, layout="NHCW")
    with pytest.raises(ValueError, match="layout must be one of"):
        data.to_layout(images, "nhwc")
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        data.test_batches(images, labels[:3], 2)


def test_numpy_integer_batch_size_is_accepted():
    images, labels = numbered_examples(4)
    assert len(list(data.test_batches(images, labels, np.int64(3)))) == 2


def test_epoch_permutation_is_seeded_by_seed_and_epoch():
    order = data.epoch_permutation(seed=3, epoch=5, num_examples=100)
    assert np.array_equal(order, np.random.default_rng([3, 5]).permutation(100))
    assert np.array_equal(order, data.epoch_permutation(3, 5, 100))
    assert not np.array_equal(order, data.epoch_permutation(3, 6, 100))
    assert not np.array_equal(order, data.epoch_permutation(4, 5, 100))


def test_same_seed_and_epoch_give_identical_batches():
    images, labels = numbered_examples(50)
    first = list(data.train_batches(images, labels, 8, seed=1, epoch=2))
    again = list(data.train_batches(images, labels, 8, seed=1, epoch=2))
    other_epoch = list(data.train_batches(images, labels, 8, seed=1, epoch=3))

    assert len(first) == len(again)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(np.concatenate([y for _, y in first]), np.concatenate([y for _, y in other_epoch]))


def test_train_batches_cover_every_example_once_in_permutation_order():
    images, labels = numbered_examples(10)
    batches = list(data.train_batches(images, labels, 4, seed=0, epoch=1))

    assert [len(y) for _, y in batches] == [4, 4, 2]  # the last, partial batch is kept
    assert data.num_batches(10, 4) == 3 and data.num_batches(8, 4) == 2
    seen = np.concatenate([y for _, y in batches])
    assert np.array_equal(seen, data.epoch_permutation(0, 1, 10))
    assert sorted(seen.tolist()) == list(range(10))
    for x, y in batches:
        assert x.shape == (len(y), 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
        assert np.array_equal(x[:, 0, 0, 0], y)  # each image travels with its label


def test_test_batches_in_order():
    images, labels = numbered_examples(7)
    batches = list(data.test_batches(images, labels, 3))

    assert [y.tolist() for _, y in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert np.array_equal(np.concatenate([x for x, _ in batches]), images)


def test_nhwc_batches_are_nchw_transposed():
    images, labels = numbered_examples(9)
    images = images + np.random.default_rng(0).random(images.shape, dtype=np.float32)
    pairs = [
        (data.train_batches(images, labels, 4, seed=2, epoch=0),
         data.train_batches(images, labels, 4, seed=2, epoch=0, layout="NHWC")),
        (data.test_batches(images, labels, 4), data.test_batches(images, labels, 4, layout="NHWC")),
    ]
    for nchw_batches, nhwc_batches in pairs:
        for (nchw, y1), (nhwc, y2) in zip(nchw_batches, nhwc_batches, strict=True):
            assert nhwc.shape == (len(y1), 28, 28, 1) and nhwc.flags.c_contiguous
            assert np.array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
            assert np.array_equal(y1, y2)


# ---------------------------------------------------------------------------
# The real data (the Debian package; CI installs it)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    if not (REAL_DIR.is_dir() and not data._missing_files(REAL_DIR)):
        pytest.fail(f"Fashion-MNIST is not installed in {REAL_DIR}: sudo apt-get install dataset-fashion-mnist")
    arrays = data.load_fashion_mnist(REAL_DIR)
    data._load_files.cache_clear()  # tests below check loading themselves
    return arrays


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory):
    """The Debian files decompressed where torchvision's FashionMNIST looks for them."""
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.EXPECTED:
        with gzip.open(REAL_DIR / f"{name}.gz") as source, open(raw / name, "wb") as target:
            shutil.copyfileobj(source, target)
    return root


def test_real_shapes_dtypes_values_and_classes(real):
    train_images, train_labels, test_images, test_labels = real

    assert train_images.shape == (60000, 1, 28, 28) and train_images.dtype == np.float32
    assert train_labels.shape == (60000,) and train_labels.dtype == np.int64
    assert test_images.shape == (10000, 1, 28, 28) and test_images.dtype == np.float32
    assert test_labels.shape == (10000,) and test_labels.dtype == np.int64
    for images in (train_images, test_images):
        assert images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test_labels, minlength=10).tolist() == [1000] * 10


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_real_data_equals_torchvision_to_tensor(real, torchvision_root, train):
    import torch
    from torchvision import datasets, transforms

    images, labels = real[:2] if train else real[2:]
    dataset = datasets.FashionMNIST(torchvision_root, train=train, download=False, transform=transforms.ToTensor())

    assert np.array_equal(labels, dataset.targets.numpy())
    # The whole set the way ToTensor scales a uint8 image: float32 division by 255.
    expected = (dataset.data.to(torch.float32).div(255)).unsqueeze(1).numpy()
    assert np.array_equal(images.view(np.uint32), expected.view(np.uint32))  # bit for bit
    # And ToTensor itself, on PIL images, for a few examples.
    for index in (0, 1, 4321, len(dataset) - 1):
        image, label = dataset[index]
        assert label == labels[index]
        assert np.array_equal(images[index].view(np.uint32), image.numpy().view(np.uint32))


def test_real_data_found_in_the_debian_dir_and_cached(real, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", REAL_DIR)

    first = data.load_fashion_mnist()
    start = time.perf_counter()
    second = data.load_fashion_mnist()
    elapsed = time.perf_counter() - start

    assert all(np.array_equal(a, b) for a, b in zip(first, real))
    assert elapsed < 5, f"second load took {elapsed:.1f} s"
    assert all(a is b for a, b in zip(first, second))  # served from the in-process cache
    assert not any(array.flags.writeable for array in second)
