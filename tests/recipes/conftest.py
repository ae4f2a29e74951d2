"""Fixtures for the recipe tests: fake MNIST and CIFAR-10 files in their real on-disk formats."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

FAKE_TRAIN_SIZE = 40
FAKE_TEST_SIZE = 20
CIFAR_BATCH_SIZE = 8  # per data_batch_{1..5}, so FAKE_TRAIN_SIZE training images in all


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` (uint8) as an uncompressed big-endian IDX file with ``magic``."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def _fake_labels(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.uint8) % 10


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A root with ``MNIST/raw/`` holding uncompressed IDX files (magic 2051 for images,
    2049 for labels) for ``FAKE_TRAIN_SIZE`` training and ``FAKE_TEST_SIZE`` test images."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count, seed in (("train", FAKE_TRAIN_SIZE, 0), ("t10k", FAKE_TEST_SIZE, 1)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _fake_images(count, (28, 28), seed), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", _fake_labels(count), 2049)
    return tmp_path


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(obj, file)


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A root with ``cifar-10-batches-py/`` holding pickled batches in the CIFAR-10 python
    format (``data``: uint8 (N, 3072) in CHW order, ``labels``: list of int) and
    ``batches.meta`` (``label_names``).

    torchvision verifies the published MD5 sums of these files, which fakes cannot match;
    for this test only, its ``check_integrity`` is reduced to an existence check.
    """
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for index in range(1, 6):
        batch = {
            "batch_label": f"training batch {index} of 5",
            "data": _fake_images(CIFAR_BATCH_SIZE, (3 * 32 * 32,), seed=index),
            "labels": _fake_labels(CIFAR_BATCH_SIZE).tolist(),
        }
        _write_pickle(folder / f"data_batch_{index}", batch)
    test_batch = {
        "batch_label": "testing batch 1 of 1",
        "data": _fake_images(FAKE_TEST_SIZE, (3 * 32 * 32,), seed=0),
        "labels": _fake_labels(FAKE_TEST_SIZE).tolist(),
    }
    _write_pickle(folder / "test_batch", test_batch)
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": label_names, "num_cases_per_batch": CIFAR_BATCH_SIZE})

    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path
