"""Tests for chaos_callbacks.recipes.models: shapes, parameter counts, shortcuts, initialisation, validation."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from chaos_callbacks.recipes.models import MODEL_NAMES, BasicBlock, build_model, resolve_dtype

IN_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
# The deep ResNets are covered by the depth-independent tests below; keep this grid fast.
SHAPE_MODELS = ["mlp", "linear", "lenet", "resnet14", "resnet20", "plain20"]


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("name", SHAPE_MODELS)
def test_output_shape(name: str, in_shape: tuple[int, int, int]) -> None:
    model = build_model(name, in_shape, num_classes=7)
    assert model(torch.randn(3, *in_shape)).shape == (3, 7)


@pytest.mark.parametrize("name", ["resnet56", "plain110"])
def test_deep_resnets_build_and_run(name: str) -> None:
    model = build_model(name, (3, 32, 32), num_classes=10)
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_resnet20_parameter_count_option_a() -> None:
    """He et al. (2016) report 0.27M parameters; with parameter-free option-A shortcuts the
    exact count is 269,722 (option-B projections would add 2,752, giving 272,474)."""
    model = build_model("resnet20", (3, 32, 32), num_classes=10)
    assert count_parameters(model) == 269_722
    assert count_parameters(build_model("plain20", (3, 32, 32), num_classes=10)) == 269_722


def test_named_models_all_build() -> None:
    for name in MODEL_NAMES:
        assert isinstance(build_model(name, (1, 8, 8), num_classes=10), nn.Module)


def test_plain_network_has_no_shortcut() -> None:
    resnet = build_model("resnet20", (3, 32, 32), num_classes=10)
    plain = build_model("plain20", (3, 32, 32), num_classes=10)
    resnet_blocks = [module for module in resnet.modules() if isinstance(module, BasicBlock)]
    plain_blocks = [module for module in plain.modules() if isinstance(module, BasicBlock)]
    assert len(resnet_blocks) == len(plain_blocks) == 9
    assert all(block.shortcut is not None for block in resnet_blocks)
    assert all(block.shortcut is None for block in plain_blocks)


@pytest.mark.parametrize("stride, in_channels, out_channels", [(1, 16, 16), (2, 16, 32)])
def test_shortcut_carries_input_when_residual_branch_is_zero(stride: int, in_channels: int, out_channels: int) -> None:
    """Zeroing the last BatchNorm kills the residual branch: a residual block then passes
    relu(shortcut(x)) on, a plain block outputs exactly zero."""
    x = torch.rand(2, in_channels, 8, 8)  # non-negative, so relu(shortcut(x)) keeps x
    outputs = {}
    for residual in (True, False):
        block = BasicBlock(in_channels, out_channels, stride, residual, "relu", batch_norm=True).eval()
        nn.init.zeros_(block.bn2.weight)
        outputs[residual] = block(x)
    assert torch.equal(outputs[False], torch.zeros_like(outputs[False]))
    expected = x[:, :, ::stride, ::stride]
    assert torch.equal(outputs[True][:, :in_channels], expected)
    assert torch.equal(outputs[True][:, in_channels:], torch.zeros_like(outputs[True][:, in_channels:]))


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet20"])
def test_normal_init_has_unit_std_weights(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), num_classes=10, init="normal")
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    assert weights.std().item() == pytest.approx(1.0, abs=0.02)
    assert weights.mean().item() == pytest.approx(0.0, abs=0.02)
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_normal_init_std_option_and_default_init_differs() -> None:
    torch.manual_seed(0)
    scaled = build_model("mlp", (1, 28, 28), num_classes=10, init="normal", init_std=0.1)
    assert scaled[1].weight.std().item() == pytest.approx(0.1, rel=0.02)
    default = build_model("mlp", (1, 28, 28), num_classes=10)
    assert default[1].weight.std().item() < 0.05  # PyTorch's U(-1/sqrt(784), 1/sqrt(784))


def test_mlp_architecture_options() -> None:
    model = build_model(
        "mlp", (1, 28, 28), 10, widths=[64, 32], activation="tanh", bias=False, batch_norm=True, dropout=0.5
    )
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 10)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model) == 2


def test_paper_mlp_784_64_10() -> None:
    """The 784-64-10 tanh MLP of arXiv:2506.08523 has 784*64 + 64 + 64*10 + 10 parameters."""
    model = build_model("mlp", (1, 28, 28), 10, widths=[64], activation="tanh", init="normal")
    assert count_parameters(model) == 784 * 64 + 64 + 64 * 10 + 10


def test_linear_is_a_single_layer() -> None:
    model = build_model("linear", (1, 8, 8), 10)
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear]


def test_lenet_batch_norm_and_dropout() -> None:
    model = build_model("lenet", (3, 32, 32), 10, batch_norm=True, dropout=0.3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2


def test_resnet_without_batch_norm() -> None:
    model = build_model("resnet14", (3, 32, 32), 10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    no_bias = build_model("resnet14", (3, 32, 32), 10, batch_norm=False, bias=False)
    assert all(m.bias is None for m in no_bias.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("vgg", {}, "model='vgg' is not supported; allowed: 'mlp'"),
        ("resnet18", {}, "allowed:"),
        ("mlp", {"activation": "sigmoid"}, "activation='sigmoid'"),
        ("mlp", {"init": "xavier"}, "init='xavier'"),
        ("mlp", {"init_std": 0.0}, "init_std must be positive"),
        ("mlp", {"dropout": 1.0}, "dropout must be in [0, 1)"),
        ("mlp", {"widths": [64, 0]}, "widths must be positive"),
        ("lenet", {"widths": [64]}, "widths only applies to model='mlp'"),
        ("resnet20", {"dropout": 0.1}, "dropout only applies"),
        ("linear", {"batch_norm": True}, "cannot have batch_norm"),
    ],
)
def test_invalid_options_raise_value_error(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(name, (1, 28, 28), 10, **options)


def test_invalid_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="in_shape must be"):
        build_model("mlp", (28, 28), 10)
    with pytest.raises(ValueError, match="num_classes must be"):
        build_model("mlp", (1, 28, 28), 0)
    with pytest.raises(ValueError, match="at least 4"):
        build_model("lenet", (1, 3, 3), 10)


def test_resolve_dtype() -> None:
    assert resolve_dtype("float64") is torch.float64
    with pytest.raises(ValueError, match="allowed: 'float32', 'float64'"):
        resolve_dtype("float16")
