"""A small zoo of image classifiers for the recipes, built by :func:`build_model`.

Every model maps a batch of shape ``(N, *in_shape)`` to logits of shape ``(N, num_classes)``
and works for any image size from 4×4 upwards (8×8 digits, 28×28 MNIST, 32×32 CIFAR).

* ``mlp``: flatten + fully connected layers (e.g. the 784-64-10 tanh network of
  Jiménez-González, Soriano & Lacasa, "Leveraging chaotic transients in the training of
  artificial neural networks", arXiv:2506.08523).
* ``linear``: a single linear layer (the linear classifier of Sasdelli, Ajanthan, Chin &
  Carneiro, "A chaos theory approach to understand neural network optimization", DICTA 2021).
* ``lenet``: a LeNet-5-style CNN (LeCun et al., "Gradient-based learning applied to document
  recognition", Proc. IEEE 1998).
* ``resnet<depth>``: the CIFAR ResNets of He et al., "Deep residual learning for image
  recognition", CVPR 2016 (6n+2 layers, three stages of 16/32/64 channels, option-A
  parameter-free shortcuts).
* ``plain<depth>``: the same networks with the shortcuts removed, the "VGG-like" networks of
  Chen, Gong et al., "Anomalous diffusion dynamics of learning in deep neural networks",
  arXiv:2009.10588.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESNET_DEPTHS: tuple[int, ...] = (14, 20, 32, 44, 56, 110)
MODEL_NAMES: tuple[str, ...] = (
    "mlp",
    "linear",
    "lenet",
    *(f"resnet{depth}" for depth in RESNET_DEPTHS),
    *(f"plain{depth}" for depth in RESNET_DEPTHS),
)
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
INITS: tuple[str, ...] = ("default", "normal")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_MLP_WIDTHS: tuple[int, ...] = (64,)


def check_choice(argument: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def resolve_dtype(name: str) -> torch.dtype:
    """Return the floating-point ``torch.dtype`` called ``name`` ("float32" or "float64")."""
    check_choice("dtype", name, tuple(DTYPES))
    return DTYPES[name]


class MLP(nn.Sequential):
    """Flatten, then ``Linear [-> BatchNorm1d] -> activation [-> Dropout]`` per hidden width,
    then a linear read-out. With no hidden widths this is a linear classifier."""

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        activation: str,
        bias: bool,
        batch_norm: bool,
        dropout: float,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for width in widths:
            layers.append(nn.Linear(previous, width, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            previous = width
        layers.append(nn.Linear(previous, num_classes, bias=bias))
        super().__init__(*layers)


class LeNet(nn.Module):
    """LeNet-5-style CNN (LeCun et al. 1998).

    Two ``5×5 conv (6, then 16 channels, padding 2) [-> BatchNorm2d] -> activation ->
    2×2 max-pool`` stages, then fully connected layers 120-84-``num_classes``. The padding keeps
    the spatial size until each pool, so the flattened size is ``16 * (H // 4) * (W // 4)``
    (784 for 28×28 MNIST, 1024 for 32×32 CIFAR, 64 for 8×8 digits).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        activation: str,
        bias: bool,
        batch_norm: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        channels, height, width = in_shape
        if height < 4 or width < 4:
            raise ValueError(f"lenet needs images of at least 4×4 pixels, got in_shape={tuple(in_shape)}")
        self.features = nn.Sequential(
            *self._conv_stage(channels, 6, activation, bias, batch_norm),
            *self._conv_stage(6, 16, activation, bias, batch_norm),
            nn.Flatten(),
        )
        self.classifier = MLP(
            16 * (height // 4) * (width // 4), (120, 84), num_classes, activation, bias, batch_norm, dropout
        )

    @staticmethod
    def _conv_stage(
        in_channels: int, out_channels: int, activation: str, bias: bool, batch_norm: bool
    ) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=bias)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers += [ACTIVATIONS[activation](), nn.MaxPool2d(2)]
        return layers

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of the image batch ``x``."""
        return self.classifier(self.features(x))


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut of He et al. (2016), option A: subsample by ``stride`` and
    zero-pad the extra output channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` subsampled and zero-padded to the block's output shape."""
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """``conv3×3 -> BN -> act -> conv3×3 -> BN``, plus the shortcut unless it is ``None``, then act.

    ``shortcut`` is ``None`` in the plain (no-shortcut) networks. Without ``batch_norm`` the
    BatchNorm layers are identities and the convolutions have biases if ``bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        residual: bool,
        activation: str,
        batch_norm: bool,
        bias: bool = True,
    ) -> None:
        super().__init__()
        conv_bias = bias and not batch_norm
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act1 = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.shortcut = OptionAShortcut(in_channels, out_channels, stride) if residual else None
        self.act2 = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        """Return the block output for the feature map ``x``."""
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016, Sec. 4.2) with ``depth = 6n + 2`` weighted layers.

    A 3×3 stem convolution with 16 channels, three stages of ``n`` :class:`BasicBlock` with
    16, 32 and 64 channels (the last two start with stride 2), global average pooling and a
    linear layer. ``residual=False`` removes every shortcut (the plain network of Chen, Gong
    et al., arXiv:2009.10588). Convolutions followed by BatchNorm carry no bias; ``bias``
    sets the others'.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int,
        residual: bool,
        activation: str,
        batch_norm: bool,
        bias: bool,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (e.g. 20, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=bias and not batch_norm)]
        if batch_norm:
            stem.append(nn.BatchNorm2d(16))
        stem.append(ACTIVATIONS[activation]())
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        channels = 16
        for stage, out_channels in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, residual, activation, batch_norm, bias))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of the image batch ``x``."""
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def init_normal_(model: nn.Module, std: float) -> None:
    """Draw every Linear/Conv weight from N(0, std²) and zero their biases (in place).

    BatchNorm affine parameters keep their defaults (weight 1, bias 0).
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    *,
    widths: Sequence[int] | None = None,
    activation: str = "relu",
    init: str = "default",
    init_std: float = 1.0,
    bias: bool = True,
    batch_norm: bool | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build the classifier ``name`` (one of :data:`MODEL_NAMES`) for images of ``in_shape``.

    Args:
        name: ``mlp``, ``linear``, ``lenet``, ``resnet<d>`` or ``plain<d>`` with ``d`` in
            :data:`RESNET_DEPTHS`.
        in_shape: ``(channels, height, width)`` of one input image.
        num_classes: number of output logits.
        widths: hidden layer widths of ``mlp`` (default ``[64]``); only ``mlp`` accepts it.
        activation: ``relu``, ``tanh`` or ``gelu`` (``linear`` has none).
        init: ``default`` keeps PyTorch's layer initialisation; ``normal`` draws every
            Linear/Conv weight from N(0, ``init_std``²) and zeroes the biases
            (the N(0, 1) weights of arXiv:2506.08523 with the default ``init_std=1.0``).
        init_std: standard deviation of the ``normal`` initialisation.
        bias: whether Linear/Conv layers have biases (convolutions followed by BatchNorm in
            the ResNet/plain networks never do).
        batch_norm: add BatchNorm; ``None`` means the architecture's standard (on for
            ResNet/plain, off otherwise). ``linear`` cannot have it.
        dropout: dropout probability after each hidden fully connected layer (``mlp`` and
            ``lenet`` only).

    Raises:
        ValueError: on an unknown name or option value, or an option the model does not use.
    """
    check_choice("model", name, MODEL_NAMES)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("init", init, INITS)
    in_shape = tuple(in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (channels, height, width) of positive sizes, got {in_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if init_std <= 0:
        raise ValueError(f"init_std must be positive, got {init_std}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if widths is not None and name != "mlp":
        raise ValueError(f"widths only applies to model='mlp', not {name!r}")
    if dropout > 0 and name not in ("mlp", "lenet"):
        raise ValueError(f"dropout only applies to model='mlp' or 'lenet', not {name!r}")
    if batch_norm and name == "linear":
        raise ValueError("model='linear' is a single linear layer and cannot have batch_norm")

    model: nn.Module
    if name in ("mlp", "linear"):
        hidden = tuple(DEFAULT_MLP_WIDTHS if widths is None else widths) if name == "mlp" else ()
        if any(width < 1 for width in hidden):
            raise ValueError(f"widths must be positive integers, got {list(hidden)}")
        model = MLP(math.prod(in_shape), hidden, num_classes, activation, bias, bool(batch_norm), dropout)
    elif name == "lenet":
        model = LeNet(in_shape, num_classes, activation, bias, bool(batch_norm), dropout)
    else:
        residual = name.startswith("resnet")
        depth = int(name.removeprefix("resnet" if residual else "plain"))
        use_bn = True if batch_norm is None else batch_norm
        model = CifarResNet(in_shape[0], num_classes, depth, residual, activation, use_bn, bias)
    if init == "normal":
        init_normal_(model, init_std)
    return model
