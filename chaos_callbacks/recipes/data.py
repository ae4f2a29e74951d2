"""LightningDataModules for the recipes: scikit-learn digits, MNIST and CIFAR-10.

All three hold their images in memory as tensors of the requested ``dtype`` (normalised once,
up front), expose ``num_classes`` and ``in_shape`` for ``LightningCLI.link_arguments``, and
split the data the same way:

* validation: a seeded ``val_split`` fraction of the official training set (when that is
  zero examples, e.g. ``val_split=0``, the test set is used for validation);
* training: the rest, optionally reduced to a seeded random ``subset`` of examples;
* test: the official test set (digits, which has none, holds out a seeded ``test_split``).

With ``full_batch=True`` every training step sees the whole training set; without
augmentation that batch is served as one slice of the in-memory tensor, in a fixed order, so
full-batch gradient descent is deterministic and costs no per-sample collation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from chaos_callbacks.recipes.models import resolve_dtype

Transform = Callable[[Tensor], Tensor]

#: Environment variable naming the folder that holds ``MNIST/raw/`` and ``cifar-10-batches-py/``.
DATA_ENV = "CHAOS_DATA"
#: The data folder when neither ``root`` nor ``$CHAOS_DATA`` is given (relative to the working
#: directory: ``data/`` in the repository root, git-ignored).
DEFAULT_ROOT = "data"


def data_root(root: str | None = None) -> str:
    """``root`` if given, else ``$CHAOS_DATA`` if set and non-empty, else :data:`DEFAULT_ROOT`."""
    return root if root is not None else os.environ.get(DATA_ENV) or DEFAULT_ROOT


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing from disk and downloading was not requested."""


class ImageTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images ``(N, C, H, W)`` and integer labels ``(N,)`` held in memory.

    Without a ``transform`` the dataset can be indexed by a slice, returning a whole batch
    (used by :class:`FullBatchSampler`); with one, indexing is per example.
    """

    def __init__(self, images: Tensor, targets: Tensor, transform: Transform | None = None) -> None:
        if images.ndim != 4 or targets.ndim != 1 or len(images) != len(targets):
            raise ValueError(
                f"expected images (N, C, H, W) and targets (N,), got {tuple(images.shape)} and {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int | slice) -> tuple[Tensor, Tensor]:
        if self.transform is None:
            return self.images[index], self.targets[index]
        if isinstance(index, slice):
            raise TypeError("a dataset with a per-example transform cannot be indexed by a slice")
        return self.transform(self.images[index]), self.targets[index]


class FullBatchSampler(Sampler[slice]):
    """Yields one ``slice(None)`` per epoch: with ``DataLoader(batch_size=None)`` the loader
    returns the entire :class:`ImageTensorDataset` as a single batch, in dataset order."""

    def __iter__(self) -> Iterator[slice]:
        yield slice(None)

    def __len__(self) -> int:
        return 1


def seeded_split(length: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Randomly split ``range(length)`` into ``(rest, held_out)`` index tensors, the held-out
    part having ``round(fraction * length)`` elements."""
    permutation = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    held_out = round(fraction * length)
    return permutation[held_out:], permutation[:held_out]


class ImageClassificationDataModule(LightningDataModule):
    """Shared splitting, normalisation and loaders; subclasses provide :meth:`load_split`.

    Subclasses set the class attributes ``num_classes``, ``in_shape`` (C, H, W), and the
    per-channel ``mean``/``std`` of pixel values in [0, 1] used when ``normalize`` is on.

    Args:
        batch_size: examples per training step (unless ``full_batch``) and per evaluation step.
        subset: keep only this many (seeded, random) training examples; ``None`` keeps all.
        full_batch: train on the whole training set at every step (gradient descent).
        normalize: standardise each channel with ``mean``/``std``; otherwise pixels lie in [0, 1].
        val_split: fraction of the official training set held out for validation.
        num_workers: DataLoader worker processes.
        dtype: ``float32`` or ``float64`` images.
        seed: seed of the splits, the subset and the mini-batch shuffling.
    """

    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: int,
        subset: int | None,
        full_batch: bool,
        normalize: bool,
        val_split: float,
        num_workers: int,
        dtype: str,
        seed: int,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if subset is not None and subset < 1:
            raise ValueError(f"subset must be None (all examples) or a positive integer, got {subset}")
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.subset = subset
        self.full_batch = full_batch
        self.normalize = normalize
        self.val_split = val_split
        self.num_workers = num_workers
        self.dtype = resolve_dtype(dtype)
        self.seed = seed
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return the official training or test images as a new ``self.dtype`` tensor of shape
        ``(N, *in_shape)`` with values in [0, 1] (normalised in place later), and int64 labels."""
        raise NotImplementedError

    def train_transform(self) -> Transform | None:
        """Per-example training augmentation applied to normalised images (none by default)."""
        return None

    def setup(self, stage: str | None = None) -> None:
        """Load the data and build the train/val/test datasets (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        pool_images, pool_targets = self.load_split(train=True)
        test_images, test_targets = self.load_split(train=False)
        if self.normalize:
            self._normalize_(pool_images)
            self._normalize_(test_images)
        train_index, val_index = seeded_split(len(pool_targets), self.val_split, self.seed)
        if self.subset is not None:
            if self.subset > len(train_index):
                raise ValueError(
                    f"subset={self.subset} exceeds the {len(train_index)} training examples "
                    "left after the validation split"
                )
            train_index = train_index[: self.subset]
        self.train_set = ImageTensorDataset(pool_images[train_index], pool_targets[train_index], self.train_transform())
        self.test_set = ImageTensorDataset(test_images, test_targets)
        self.val_set = (
            ImageTensorDataset(pool_images[val_index], pool_targets[val_index]) if len(val_index) else self.test_set
        )

    def _normalize_(self, images: Tensor) -> None:
        """Standardise ``images`` in place with the per-channel ``mean`` and ``std``."""
        images.sub_(torch.tensor(self.mean, dtype=self.dtype).view(-1, 1, 1))
        images.div_(torch.tensor(self.std, dtype=self.dtype).view(-1, 1, 1))

    @property
    def train_batch_size(self) -> int:
        """Examples per training step: the whole training set when ``full_batch``."""
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for train_batch_size")
        return len(self.train_set) if self.full_batch else self.batch_size

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) mini-batches, or the whole training set when ``full_batch``."""
        train_set = self._require(self.train_set)
        if self.full_batch and train_set.transform is None:
            return DataLoader(train_set, sampler=FullBatchSampler(), batch_size=None, **self._worker_options())
        return DataLoader(
            train_set,
            batch_size=self.train_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            **self._worker_options(),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``batch_size`` (also with ``full_batch``)."""
        return DataLoader(self._require(self.val_set), batch_size=self.batch_size, **self._worker_options())

    def test_dataloader(self) -> DataLoader:
        """Test batches of ``batch_size`` (also with ``full_batch``)."""
        return DataLoader(self._require(self.test_set), batch_size=self.batch_size, **self._worker_options())

    def _worker_options(self) -> dict[str, int | bool]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    @staticmethod
    def _require(dataset: ImageTensorDataset | None) -> ImageTensorDataset:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return dataset


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes; no download).

    Pixel values 0..16 are scaled to [0, 1]; ``mean``/``std`` are those of all 1,797 images.
    Having no official test set, a seeded ``test_split`` fraction is held out as one.

    Args:
        test_split: fraction of the 1,797 images held out as the test set; the other
            arguments are those of :class:`ImageClassificationDataModule`.
    """

    num_classes = 10
    in_shape = (1, 8, 8)
    mean = (0.3053,)
    std = (0.3760,)

    def __init__(
        self,
        batch_size: int = 64,
        subset: int | None = None,
        full_batch: bool = False,
        normalize: bool = True,
        val_split: float = 0.1,
        test_split: float = 0.2,
        num_workers: int = 0,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, subset, full_batch, normalize, val_split, num_workers, dtype, seed)
        if not 0.0 < test_split < 1.0:
            raise ValueError(f"test_split must be in (0, 1), got {test_split}")
        self.test_split = test_split
        self.save_hyperparameters()

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return the seeded training or held-out test part of the digits."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).to(self.dtype).div_(16.0).unsqueeze(1)
        targets = torch.from_numpy(digits.target).long()
        train_index, test_index = seeded_split(len(targets), self.test_split, self.seed)
        index = train_index if train else test_index
        return images[index], targets[index]


def require_files(directory: str, filenames: tuple[str, ...], dataset: str, hint: str) -> None:
    """Raise :class:`DatasetNotFoundError` naming the missing files and how to provide them."""
    missing = [name for name in filenames if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise DatasetNotFoundError(
            f"{dataset} files not found in {os.path.abspath(directory)}: missing {', '.join(missing)}. "
            f"{hint} Or pass download=True on a machine with internet access."
        )


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST (LeCun et al. 1998) via ``torchvision.datasets.MNIST``, read from
    ``<root>/MNIST/raw/`` (60,000 training and 10,000 test 28×28 images).

    Args:
        root: directory holding ``MNIST/raw/``; ``None``: ``$CHAOS_DATA``, else ``data``.
        download: fetch the files from the internet if they are missing.
        The other arguments are those of :class:`ImageClassificationDataModule`.
    """

    num_classes = 10
    in_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)
    raw_files = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        subset: int | None = None,
        full_batch: bool = False,
        normalize: bool = True,
        val_split: float = 0.1,
        download: bool = False,
        num_workers: int = 0,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, subset, full_batch, normalize, val_split, num_workers, dtype, seed)
        self.root = data_root(root)
        self.download = download
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Download the files when ``download`` is set (on one process only)."""
        if self.download:
            from torchvision.datasets import MNIST

            MNIST(self.root, download=True)  # fetches the training and test files

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return the official MNIST training or test split."""
        from torchvision.datasets import MNIST

        require_files(
            os.path.join(self.root, "MNIST", "raw"),
            self.raw_files,
            "MNIST",
            "Copy the four uncompressed IDX files there (gunzip the *.gz files of the MNIST distribution), "
            f"or point --data.root or ${DATA_ENV} at the folder that holds MNIST/raw/.",
        )
        dataset = MNIST(self.root, train=train, download=False)
        return dataset.data.to(self.dtype).div_(255.0).unsqueeze(1), dataset.targets.long()


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10 (Krizhevsky 2009) via ``torchvision.datasets.CIFAR10``, read from
    ``<root>/cifar-10-batches-py/`` (50,000 training and 10,000 test 32×32 colour images).

    ``augment`` adds the standard random crop (32, padding 4, zero fill before normalisation)
    and horizontal flip of He et al. (2016) to the training images.

    Args:
        root: directory holding ``cifar-10-batches-py/``; ``None``: ``$CHAOS_DATA``, else ``data``.
        augment: random-crop and flip the training images.
        download: fetch and extract the archive from the internet if the files are missing.
        The other arguments are those of :class:`ImageClassificationDataModule`.
    """

    num_classes = 10
    in_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    batch_files = (*(f"data_batch_{index}" for index in range(1, 6)), "test_batch", "batches.meta")

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        subset: int | None = None,
        full_batch: bool = False,
        normalize: bool = True,
        augment: bool = False,
        val_split: float = 0.1,
        download: bool = False,
        num_workers: int = 0,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, subset, full_batch, normalize, val_split, num_workers, dtype, seed)
        self.root = data_root(root)
        self.augment = augment
        self.download = download
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Download and extract the archive when ``download`` is set (on one process only)."""
        if self.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.root, train=True, download=True)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return the official CIFAR-10 training or test split."""
        from torchvision.datasets import CIFAR10

        require_files(
            os.path.join(self.root, CIFAR10.base_folder),
            self.batch_files,
            "CIFAR-10",
            "Extract cifar-10-python.tar.gz from the CIFAR-10 site into the root directory, "
            f"or point --data.root or ${DATA_ENV} at the folder that holds cifar-10-batches-py/.",
        )
        dataset = CIFAR10(self.root, train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # stored as (N, H, W, C)
        images = images.to(self.dtype, memory_format=torch.contiguous_format).div_(255.0)
        return images, torch.tensor(dataset.targets, dtype=torch.long)

    def train_transform(self) -> Transform | None:
        """Random crop with 4-pixel padding and horizontal flip when ``augment`` is on."""
        if not self.augment:
            return None
        from torchvision.transforms import v2

        # Padding happens after normalisation, so pad with the normalised value of a black pixel.
        black = [-m / s for m, s in zip(self.mean, self.std, strict=True)] if self.normalize else 0.0
        return v2.Compose([v2.RandomCrop(32, padding=4, fill=black), v2.RandomHorizontalFlip()])
