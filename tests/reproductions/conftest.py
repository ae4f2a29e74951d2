"""Fixtures for the smoke tests of ``reproductions/*.py`` (all marked ``slow``).

The reproductions read real MNIST; the tests give them a small fake MNIST in the real on-disk
format instead, so that the suite never depends on ``../shared``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.recipes.conftest import _write_idx, cifar_root  # noqa: F401  (fixture for the CIFAR-10 paths)

FAKE_MNIST_TRAIN = 512
FAKE_MNIST_TEST = 128


@pytest.fixture
def fake_mnist_root(tmp_path: Path) -> Path:
    """A root with ``MNIST/raw/`` holding ``FAKE_MNIST_TRAIN`` training and ``FAKE_MNIST_TEST``
    test images whose class is written into the pixels (a bright 8×8 block at a class-dependent
    place), so that a few hundred SGD steps do learn something."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", FAKE_MNIST_TRAIN), ("t10k", FAKE_MNIST_TEST)):
        labels = rng.integers(0, 10, size=count).astype(np.uint8)
        images = rng.integers(0, 64, size=(count, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            row, col = divmod(int(label), 5)
            image[2 + 12 * row : 10 + 12 * row, 1 + 5 * col : 6 + 5 * col] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)
    return tmp_path / "data"
