"""The chaos-train CLI: every config parses and runs a few steps on generated data in the real formats."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from chaos_callbacks.recipes.cli import run as main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _data_class(config: Path) -> str:
    return yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]


def test_there_are_configs():
    names = {c.name for c in CONFIGS}
    assert "quickstart.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] == yaml.safe_load(config.read_text())["model"]["model"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_runs_a_few_steps(config, tmp_path, request):
    args = ["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.max_epochs", "3",
            "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_checkpointing", "false"]
    kind = _data_class(config)
    if kind == "MNISTDataModule":
        args += ["--data.root", str(request.getfixturevalue("mnist_root"))]
    elif kind == "CIFAR10DataModule":
        args += ["--data.root", str(request.getfixturevalue("cifar_root"))]
    if kind != "DigitsDataModule":
        args += ["--data.subset", "32"]
        if not yaml.safe_load(config.read_text())["data"].get("init_args", {}).get("full_batch"):
            args += ["--data.batch_size", "16"]
    cli = main(args)
    assert cli.trainer.global_step == 3


def test_missing_mnist_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "MNIST" / "raw")):
        main(["fit", "--config", str(ROOT / "configs" / "mnist_mlp_chaos.yaml"), "--data.root", str(tmp_path),
              "--trainer.max_steps", "1", "--trainer.logger", "false"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_quickstart_end_to_end_with_tensorboard(tmp_path, capsys):
    """The README demo: all callbacks, a summary printed, TensorBoard serves the charts."""
    cli = main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_checkpointing", "false"])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/acc"]) >= 0.9
    for name in ("hessian/lambda_max",):
        assert name in metrics
    log_dir = Path(cli.trainer.logger.log_dir)
    port = _free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        tags = _get(f"{base}/scalars/tags")
        run_tags = set().union(*[set(t) for t in tags.values()])
        for tag in ("hessian/lambda_max", "hessian/eig_3", "hessian/trace", "train/loss", "val/acc"):
            assert tag in run_tags, tag
        layout = _get(f"{base}/custom_scalars/layout")
        titles = {cat["title"] for cat in layout["category"]}
        assert {"hessian", "lyapunov", "curvature_lr", "diffusion", "grad_tail"} <= titles
        images = _get(f"{base}/images/tags")
        assert any("hessian/spectral_density" in t for t in images.values())
    finally:
        board.terminate()
        board.wait(timeout=30)


@pytest.mark.ddp
def test_quickstart_under_ddp_through_the_cli(tmp_path):
    """The documented multi-GPU path, on 2 CPU processes (gloo), with all five callbacks attached."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "chaos_callbacks.recipes.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_steps", "12",
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_checkpointing", "false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "chaos_callbacks summary after 12 steps" in proc.stdout + proc.stderr
    assert "hessian/lambda_max" in proc.stdout + proc.stderr


def test_console_script_exits_zero(tmp_path):
    """``chaos-train`` as pip installs it (``sys.exit(main())``) must exit 0 after a successful fit.

    The target is read from pyproject.toml (an installed entry point may predate the checkout)."""
    target = re.search(r'^chaos-train = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert target == "chaos_callbacks.recipes.cli:main"
    module, function = target.split(":")
    code = (
        "import importlib, sys\n"
        f"sys.argv = ['chaos-train', 'fit', '--config', {str(ROOT / 'configs' / 'quickstart.yaml')!r},\n"
        f"            '--trainer.max_steps', '2', '--trainer.logger.init_args.save_dir', {str(tmp_path)!r},\n"
        "            '--trainer.enable_checkpointing', 'false']\n"
        f"sys.exit(importlib.import_module({module!r}).{function}())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
