"""The front door of ``chaos-train``: packaging, short names, --help, error messages, old class
paths, the data root. In-process CLI calls of a few steps each (``run`` raises SystemExit where
the console script would exit)."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback

import chaos_callbacks
from chaos_callbacks.recipes import _legacy, cli
from chaos_callbacks.recipes.cli import run
from chaos_callbacks.recipes.data import CIFAR10DataModule, DigitsDataModule, MNISTDataModule

ROOT = Path(__file__).resolve().parents[2]
CALLBACKS = sorted(chaos_callbacks.__all__)
DATA_MODULES = ("DigitsDataModule", "MNISTDataModule", "CIFAR10DataModule")
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Runs without a logger save their config.yaml in the working directory: not the repository."""
    monkeypatch.chdir(tmp_path)


def _exit(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    return exit_info.value.code or 0


def _printed_config(args: list[str], capsys) -> dict:
    assert _exit(["fit", *args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


# ------------------------------------------------------------------ packaging


def test_the_wheel_holds_only_chaos_callbacks():
    setuptools = pytest.importorskip("setuptools")
    text = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]$", text, re.M)[1]
    patterns = [p.strip().strip('"') for p in include.split(",")]
    packages = setuptools.find_packages(where=str(ROOT), include=patterns)
    assert "chaos_callbacks.recipes" in packages
    assert all(p == "chaos_callbacks" or p.startswith("chaos_callbacks.") for p in packages), packages
    assert re.search(r'^chaos-train = "chaos_callbacks\.recipes\.cli:main"$', text, re.M)
    assert not (ROOT / "recipes").exists()


def test_the_extra_is_installed_here():
    assert cli.missing_extra_modules() == []


def test_a_missing_extra_is_named_with_its_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(cli.EXTRA_MODULES, "no_such_module_for_the_test", "scikit-learn")
    assert _exit(["fit", "--help"]) == 1
    err = capsys.readouterr().err
    assert "missing: scikit-learn" in err
    assert "pip install 'chaos_callbacks[recipes]'" in err


# ------------------------------------------------------------------ short names and --help


def test_help_lists_every_callback_and_data_module(capsys):
    assert _exit(["fit", "--help"]) == 0
    text = re.sub(r"\s+", "", capsys.readouterr().out)  # argparse wraps long class paths anywhere
    for name in (*(f"chaos_callbacks.{c}" for c in CALLBACKS), *(f"chaos_callbacks.recipes.data.{d}" for d in DATA_MODULES)):
        assert name in text, name


@pytest.mark.parametrize("name", CALLBACKS)
def test_callback_help_by_short_name(name, capsys):
    assert _exit(["fit", "--trainer.callbacks.help", name]) == 0
    out = capsys.readouterr().out
    parameters = [p for p in cli.inspect.signature(getattr(chaos_callbacks, name)).parameters]
    for parameter in parameters:
        assert f"--trainer.callbacks.{parameter}" in out


def test_data_help_by_short_name(capsys):
    assert _exit(["fit", "--data.help", "MNISTDataModule"]) == 0
    assert "--data.root" in capsys.readouterr().out


def test_every_callback_by_short_name_without_a_config_trains():
    """No config at all: the digits data module is the default, each callback added by its name."""
    args = ["fit", *QUIET, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]
    for name in CALLBACKS:
        args += [f"--trainer.callbacks+={name}"]
        if name in ("HessianSpectrumMonitor", "GradientTailFitter"):
            args += ["--trainer.callbacks.every_n_steps=1"]  # applies to the callback just added
    cli_ = run(args)
    assert cli_.trainer.global_step == 3
    attached = {type(c).__name__ for c in cli_.trainer.callbacks}
    assert set(CALLBACKS) <= attached
    assert isinstance(cli_.datamodule, DigitsDataModule)


def test_short_names_added_to_a_config(capsys):
    config = _printed_config(["--config", str(ROOT / "configs" / "mnist_lenet_diffusion.yaml"),
                              "--trainer.callbacks+=LyapunovTwinRun", "--trainer.callbacks.n_twins=2",
                              "--data", "CIFAR10DataModule"], capsys)
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert paths[-1] == "chaos_callbacks.LyapunovTwinRun" and config["trainer"]["callbacks"][-1]["init_args"]["n_twins"] == 2
    assert "chaos_callbacks.HessianSpectrumMonitor" in paths  # the config's callbacks are kept
    assert config["data"]["class_path"] == "chaos_callbacks.recipes.data.CIFAR10DataModule"


def test_data_module_by_short_name_trains_on_mnist_files(mnist_root, monkeypatch):
    monkeypatch.setenv("CHAOS_DATA", str(mnist_root))
    cli_ = run(["fit", *QUIET, "--data", "MNISTDataModule", "--data.subset", "16", "--data.batch_size", "8",
                "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])
    assert isinstance(cli_.datamodule, MNISTDataModule) and cli_.datamodule.root == str(mnist_root)
    assert cli_.trainer.global_step == 2


# ------------------------------------------------------------------ errors name the class and the argument

BAD_VALUES = {
    "HessianSpectrumMonitor": ("every_n_steps", 0),
    "LyapunovTwinRun": ("n_twins", 0),
    "CurvatureLRScheduler": ("every_n_steps", 0),
    "DiffusionTracker": ("dim", 1),
    "GradientTailFitter": ("num_samples", 0),
}


def _write_config(tmp_path: Path, callback: dict, data: str = "DigitsDataModule") -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"max_steps": 1, "logger": False, "callbacks": [callback]},
                                    "data": {"class_path": data}}))
    return str(path)


def _first_error_line(err: str) -> tuple[int, str]:
    lines = err.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    return index, lines[index]


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_yaml_value_is_named_first(name, tmp_path, capsys):
    argument, value = BAD_VALUES[name]
    config = _write_config(tmp_path, {"class_path": name, "init_args": {argument: value}})
    assert _exit(["fit", "--config", config]) == 2
    err = capsys.readouterr().err
    index, line = _first_error_line(err)
    assert line.startswith(f"error: {name}: {argument} must be"), err
    assert index <= 3 and "Traceback" not in err


@pytest.mark.parametrize(
    ("init_args", "expected"),
    [({"every_n_steps": "often"}, "HessianSpectrumMonitor: every_n_steps: Expected a <class 'int'>"),
     ({"evry_n_steps": 5}, "HessianSpectrumMonitor: evry_n_steps is not an argument of HessianSpectrumMonitor")],
    ids=["wrong type", "unknown argument"],
)
def test_a_value_jsonargparse_rejects_is_named_first(init_args, expected, tmp_path, capsys):
    config = _write_config(tmp_path, {"class_path": "HessianSpectrumMonitor", "init_args": init_args})
    assert _exit(["fit", "--config", config]) == 2
    err = capsys.readouterr().err
    index, line = _first_error_line(err)
    assert line.startswith(f"error: {expected}"), err
    assert index <= 3 and len(err.splitlines()) < 40  # not the usage of every Trainer option


def test_an_unknown_argument_lists_the_accepted_ones(tmp_path, capsys):
    config = _write_config(tmp_path, {"class_path": "ChaosSummary", "init_args": {"colour": "red"}})
    assert _exit(["fit", "--config", config]) == 2
    line = _first_error_line(capsys.readouterr().err)[1]
    assert line.startswith("error: ChaosSummary: colour is not an argument of ChaosSummary")


def test_a_bad_data_module_value_names_the_data_module(capsys):
    assert _exit(["fit", "--data", "DigitsDataModule", "--data.batch_size", "0"]) == 2
    assert _first_error_line(capsys.readouterr().err)[1] == (
        "error: DigitsDataModule: batch_size must be a positive integer, got 0")


def test_a_fit_start_check_is_named_first(capsys):
    """Two monitors with one (empty) prefix: refused at fit start, before the first step."""
    args = ["fit", *QUIET, "--trainer.max_steps", "1", "--trainer.callbacks+=HessianSpectrumMonitor",
            "--trainer.callbacks.every_n_steps=5", "--trainer.callbacks+=HessianSpectrumMonitor"]
    assert _exit(args) == 2
    err = capsys.readouterr().err
    line = _first_error_line(err)[1]
    assert line.startswith("error: HessianSpectrumMonitor: prefix=") and "Traceback" not in err


class ExplodingCallback(Callback):
    def on_train_batch_end(self, *args, **kwargs) -> None:
        raise ValueError("boom: a bug while training, not a configuration error")


def test_an_error_while_training_is_not_disguised():
    """A ValueError raised after fit start is not a configuration error: it propagates as is."""
    args = ["fit", *QUIET, "--trainer.max_steps", "1", f"--trainer.callbacks+={__name__}.ExplodingCallback"]
    with pytest.raises(ValueError, match="boom"):
        run(args)


# ------------------------------------------------------------------ old class paths (one version)

OLD_STYLE = """
trainer:
  max_steps: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: chaos_callbacks.HessianSpectrumMonitor
      init_args: {every_n_steps: 100}
    - class_path: chaos_callbacks.LyapunovTwinRun
    - class_path: chaos_callbacks.DiffusionTracker
      init_args: {window: 40, dim: 64}
    - class_path: chaos_callbacks.GradientTailFitter
      init_args: {every_n_steps: 100}
    - class_path: chaos_callbacks.CurvatureLRScheduler
      init_args: {every_n_steps: 100, warmup_steps: 50}
model:
  model: mlp
  widths: [16]
data:
  class_path: recipes.data.DigitsDataModule
  init_args:
    batch_size: 64
"""


def test_old_class_paths_in_a_yaml_train_with_a_deprecation_warning(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(OLD_STYLE)
    with pytest.warns(DeprecationWarning, match=r"'recipes\.data\.DigitsDataModule' is deprecated.*"
                                                 r"'chaos_callbacks\.recipes\.data\.DigitsDataModule'"):
        cli_ = run(["fit", "--config", str(config), "--trainer.enable_checkpointing", "false"])
    assert type(cli_.datamodule) is DigitsDataModule  # this package's class, not another "recipes"
    assert cli_.trainer.global_step == 2
    assert "recipes" not in sys.modules


def test_old_class_path_on_the_command_line(capsys):
    with pytest.warns(_legacy.LegacyClassPathWarning):
        config = _printed_config(["--data=recipes.data.CIFAR10DataModule"], capsys)
    assert config["data"]["class_path"] == "chaos_callbacks.recipes.data.CIFAR10DataModule"
    with pytest.warns(_legacy.LegacyClassPathWarning):
        config = _printed_config(["--data", '{"class_path": "recipes.data.MNISTDataModule"}'], capsys)
    assert config["data"]["class_path"] == "chaos_callbacks.recipes.data.MNISTDataModule"


@pytest.mark.parametrize(
    ("path", "upgraded"),
    [("recipes.data.MNISTDataModule", "chaos_callbacks.recipes.data.MNISTDataModule"),
     ("recipes.module.ClassificationModule", "chaos_callbacks.recipes.module.ClassificationModule"),
     ("chaos_callbacks.recipes.data.MNISTDataModule", None),
     ("myrecipes.data.MNISTDataModule", None),
     ("recipes.other.Thing", None),
     ("lightning.pytorch.callbacks.LearningRateMonitor", None)],
)
def test_upgrade_path_rewrites_only_old_recipe_paths(path, upgraded):
    if upgraded is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _legacy.upgrade_path(path) == path
    else:
        with pytest.warns(_legacy.LegacyClassPathWarning):
            assert _legacy.upgrade_path(path) == upgraded


#: The arguments of each callback's checkpoint state key before ``prefix`` existed (0.1.0).
PREVIOUS_STATE_KEYS = {
    "HessianSpectrumMonitor": ("every_n_steps", "top_k", "method", "probe"),
    "CurvatureLRScheduler": ("every_n_steps", "mode", "probe"),
    "DiffusionTracker": ("window", "dim", "exact", "every_n_steps", "seed"),
    "GradientTailFitter": ("every_n_steps", "num_samples", "method", "target"),
    "LyapunovTwinRun": ("mode", "renormalize_every", "n_twins", "seed"),
}


def test_a_checkpoint_of_the_previous_version_resumes(tmp_path):
    """A checkpoint written under the old class paths (simulated: its data module's recorded
    ``_class_path`` set back to ``recipes.data...`` and each callback's state filed under the
    previous version's key) resumes every callback's state."""
    config = tmp_path / "old.yaml"
    config.write_text(OLD_STYLE)
    with pytest.warns(DeprecationWarning):
        first = run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    (checkpoint_path,) = Path(tmp_path).rglob("*.ckpt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["_class_path"] = "recipes.data.DigitsDataModule"
    previous = {}
    for callback in first.trainer.callbacks:
        if (name := type(callback).__name__) in PREVIOUS_STATE_KEYS:
            kwargs = {key: getattr(callback, key) for key in PREVIOUS_STATE_KEYS[name]}
            previous[f"{name}{kwargs!r}"] = checkpoint["callbacks"].pop(callback.state_key)
    assert len(previous) == len(PREVIOUS_STATE_KEYS)
    checkpoint["callbacks"].update(previous)
    torch.save(checkpoint, checkpoint_path)
    with pytest.warns(DeprecationWarning):
        resumed = run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "again"),
                       "--trainer.max_steps", "4", "--ckpt_path", str(checkpoint_path)])
    assert resumed.trainer.global_step == 4
    keys = {c.state_key for c in resumed.trainer.callbacks if type(c).__name__ in PREVIOUS_STATE_KEYS}
    assert keys == set(previous)
    twin = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "LyapunovTwinRun")
    assert twin.state_dict().keys() == previous[twin.state_key].keys()


# ------------------------------------------------------------------ data root


def test_data_root_is_argument_then_environment_then_data(monkeypatch, tmp_path):
    monkeypatch.delenv("CHAOS_DATA", raising=False)
    assert MNISTDataModule().root == "data" and CIFAR10DataModule().root == "data"
    monkeypatch.setenv("CHAOS_DATA", str(tmp_path))
    assert MNISTDataModule().root == str(tmp_path) and CIFAR10DataModule().root == str(tmp_path)
    assert MNISTDataModule(root="elsewhere").root == "elsewhere"


def test_no_development_machine_paths_in_the_docs_or_configs():
    files = [ROOT / "README.md", ROOT / "pyproject.toml", *ROOT.glob("configs/*.yaml"), *ROOT.glob("docs/*.md"),
             *ROOT.glob("chaos_callbacks/recipes/*.py")]
    offenders = [f.name for f in files if "../shared" in f.read_text() or "shared/data" in f.read_text()]
    assert not offenders
