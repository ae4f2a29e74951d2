"""Tests for chaos_callbacks.recipes.data: digits, MNIST and CIFAR-10 data modules (fake files, no download)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from chaos_callbacks.recipes.data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FullBatchSampler,
    MNISTDataModule,
)

FAKE_TRAIN_SIZE, FAKE_TEST_SIZE = 40, 20  # as written by the mnist_root / cifar_root fixtures
CIFAR_BATCH_SIZE = 8  # images per fake data_batch_{1..5}

DIGITS_TEST = round(0.2 * 1797)  # 359
DIGITS_VAL = round(0.1 * (1797 - DIGITS_TEST))  # 144
DIGITS_TRAIN = 1797 - DIGITS_TEST - DIGITS_VAL  # 1294


def set_up(datamodule):
    datamodule.setup("fit")
    return datamodule


def test_digits_splits_shapes_and_dtype() -> None:
    dm = set_up(DigitsDataModule())
    assert (dm.num_classes, dm.in_shape) == (10, (1, 8, 8))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (DIGITS_TRAIN, DIGITS_VAL, DIGITS_TEST)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert set(dm.train_set.targets.tolist()) == set(range(10))


def test_digits_normalisation() -> None:
    raw = set_up(DigitsDataModule(normalize=False)).train_set.images
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0
    normalised = set_up(DigitsDataModule()).train_set.images
    assert normalised.mean().item() == pytest.approx(0.0, abs=0.05)
    assert normalised.std().item() == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(normalised, (raw - 0.3053) / 0.3760)


def test_digits_float64() -> None:
    dm = set_up(DigitsDataModule(dtype="float64"))
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        assert dataset.images.dtype == torch.float64
    assert next(iter(dm.val_dataloader()))[0].dtype == torch.float64


def test_digits_split_is_seeded() -> None:
    first, again, other = (set_up(DigitsDataModule(seed=seed)) for seed in (0, 0, 1))
    assert torch.equal(first.train_set.images, again.train_set.images)
    assert torch.equal(first.test_set.targets, again.test_set.targets)
    assert not torch.equal(first.test_set.images, other.test_set.images)


def test_subset_is_seeded_part_of_training_set() -> None:
    full = set_up(DigitsDataModule())
    subset = set_up(DigitsDataModule(subset=100))
    assert len(subset.train_set) == 100
    assert torch.equal(subset.train_set.images, full.train_set.images[:100])
    assert torch.equal(subset.val_set.images, full.val_set.images)  # the validation set does not shrink


def test_full_batch_yields_whole_training_set_in_fixed_order() -> None:
    dm = set_up(DigitsDataModule(subset=500, full_batch=True, batch_size=32))
    assert dm.train_batch_size == 500
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, FullBatchSampler) and len(loader) == 1
    (x, y), (x_again, y_again) = next(iter(loader)), next(iter(loader))
    assert x.shape == (500, 1, 8, 8) and y.shape == (500,)
    assert torch.equal(x, dm.train_set.images) and torch.equal(x, x_again) and torch.equal(y, y_again)
    assert next(iter(dm.val_dataloader()))[0].shape[0] == 32  # evaluation keeps batch_size


def test_minibatch_shuffle_is_seeded() -> None:
    first = next(iter(set_up(DigitsDataModule(seed=3)).train_dataloader()))[1]
    second = next(iter(set_up(DigitsDataModule(seed=3)).train_dataloader()))[1]
    assert torch.equal(first, second)


def test_zero_val_split_validates_on_test_set() -> None:
    dm = set_up(DigitsDataModule(val_split=0.0))
    assert dm.val_set is dm.test_set
    assert len(dm.train_set) == 1797 - DIGITS_TEST


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"subset": 0}, "subset must be None"),
        ({"val_split": 1.0}, "val_split must be in [0, 1)"),
        ({"test_split": 0.0}, "test_split must be in (0, 1)"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"dtype": "float16"}, "dtype='float16' is not supported; allowed: 'float32', 'float64'"),
    ],
)
def test_invalid_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DigitsDataModule(**options)


def test_subset_larger_than_training_set() -> None:
    with pytest.raises(ValueError, match="subset=5000 exceeds the 1294 training examples"):
        DigitsDataModule(subset=5000).setup("fit")


def test_dataloader_before_setup() -> None:
    with pytest.raises(RuntimeError, match="call setup"):
        DigitsDataModule().train_dataloader()


def read_idx_images(path: Path) -> np.ndarray:
    data = path.read_bytes()
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(-1, 28, 28)


def test_mnist_loads_idx_files(mnist_root: Path) -> None:
    dm = set_up(MNISTDataModule(root=str(mnist_root), normalize=False, val_split=0.0, batch_size=16))
    assert (dm.num_classes, dm.in_shape) == (10, (1, 28, 28))
    assert (len(dm.train_set), len(dm.test_set)) == (FAKE_TRAIN_SIZE, FAKE_TEST_SIZE)
    expected = read_idx_images(mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    torch.testing.assert_close(dm.test_set.images[:, 0], torch.from_numpy(expected.astype(np.float32)) / 255)
    assert dm.test_set.targets.tolist() == [i % 10 for i in range(FAKE_TEST_SIZE)]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_mnist_normalisation_dtype_and_full_batch(mnist_root: Path) -> None:
    raw = set_up(MNISTDataModule(root=str(mnist_root), normalize=False, dtype="float64"))
    dm = set_up(MNISTDataModule(root=str(mnist_root), dtype="float64", full_batch=True, subset=20))
    assert len(raw.val_set) == round(0.1 * FAKE_TRAIN_SIZE)
    torch.testing.assert_close(dm.val_set.images, (raw.val_set.images - 0.1307) / 0.3081)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float64


def test_mnist_missing_files_error_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as error:
        MNISTDataModule(root=str(tmp_path)).setup("fit")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "download=True" in message


def test_mnist_error_lists_only_missing_files(mnist_root: Path) -> None:
    (mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte\. "):
        MNISTDataModule(root=str(mnist_root)).setup("fit")


def test_cifar_loads_pickled_batches(cifar_root: Path) -> None:
    dm = set_up(CIFAR10DataModule(root=str(cifar_root), normalize=False, val_split=0.0, batch_size=8))
    assert (dm.num_classes, dm.in_shape) == (10, (3, 32, 32))
    assert (len(dm.train_set), len(dm.test_set)) == (5 * CIFAR_BATCH_SIZE, FAKE_TEST_SIZE)
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as file:
        batch = pickle.load(file)
    expected = torch.from_numpy(batch["data"].reshape(-1, 3, 32, 32).astype(np.float32)) / 255
    torch.testing.assert_close(dm.test_set.images, expected)
    assert dm.test_set.images.is_contiguous()
    assert dm.test_set.targets.tolist() == batch["labels"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar_normalisation_per_channel(cifar_root: Path) -> None:
    raw = set_up(CIFAR10DataModule(root=str(cifar_root), normalize=False))
    dm = set_up(CIFAR10DataModule(root=str(cifar_root)))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(dm.train_set.images, (raw.train_set.images - mean) / std)


def test_cifar_augmentation(cifar_root: Path) -> None:
    dm = set_up(CIFAR10DataModule(root=str(cifar_root), augment=True, dtype="float64"))
    assert dm.train_set.transform is not None and dm.val_set.transform is None
    torch.manual_seed(0)
    views = torch.stack([dm.train_set[0][0] for _ in range(20)])
    assert views.shape == (20, 3, 32, 32) and views.dtype == torch.float64
    assert len(torch.unique(views, dim=0)) > 1  # random crops/flips differ
    # Padding is black before normalisation: a constant -mean/std per channel.
    black = torch.tensor([-0.4914 / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616], dtype=torch.float64)
    values = views.permute(1, 0, 2, 3).reshape(3, -1)
    original = dm.train_set.images[0].reshape(3, -1)
    for channel in range(3):
        new_values = values[channel][~torch.isin(values[channel], original[channel])]
        assert torch.allclose(new_values, black[channel].expand_as(new_values))


def test_cifar_full_batch_with_augmentation_uses_one_shuffled_batch(cifar_root: Path) -> None:
    dm = set_up(CIFAR10DataModule(root=str(cifar_root), augment=True, full_batch=True, val_split=0.0))
    loader = dm.train_dataloader()
    assert loader.batch_size == 5 * CIFAR_BATCH_SIZE and len(loader) == 1
    assert next(iter(loader))[0].shape == (5 * CIFAR_BATCH_SIZE, 3, 32, 32)


def test_cifar_missing_files_error_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as error:
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "batches.meta" in message and "download=True" in message
