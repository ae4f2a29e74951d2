"""``chaos-train``: the LightningCLI entry point of the recipes.

    chaos-train fit --config configs/quickstart.yaml
    chaos-train fit --config configs/mnist_mlp_chaos.yaml --trainer.max_epochs 5
    chaos-train fit --config configs/quickstart.yaml --trainer.strategy ddp --trainer.devices 2
    chaos-train fit --data MNISTDataModule --trainer.callbacks+=HessianSpectrumMonitor \\
        --trainer.callbacks.every_n_steps 50
    chaos-train fit --trainer.callbacks.help HessianSpectrumMonitor

Every chaos_callbacks callback and every recipe data module is known by its short name, with
or without a config; the data module defaults to :class:`DigitsDataModule` (embedded, no
download). The model's ``num_classes`` and ``in_shape`` are linked from the data module.

A configuration error (a bad value in a config or on the command line, caught by jsonargparse,
by a constructor or by a callback at fit start) exits with status 2 and a first ``error:`` line
naming the class and the argument; set ``JSONARGPARSE_DEBUG=1`` for the traceback. Old class
paths ``recipes.<module>.<Name>`` still work for one version (:mod:`._legacy`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import traceback
from typing import Any, NoReturn

# Importable without the extra (lightning.pytorch.cli guards its jsonargparse import), so that
# run() can say what to install.
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import chaos_callbacks
from chaos_callbacks.recipes import _legacy
from chaos_callbacks.recipes.data import DigitsDataModule, ImageClassificationDataModule
from chaos_callbacks.recipes.module import ClassificationModule

EXTRA = "recipes"
#: Import name -> distribution of what the ``recipes`` extra installs beyond the core.
EXTRA_MODULES = {
    "jsonargparse": "jsonargparse[signatures]",
    "docstring_parser": "jsonargparse[signatures]",
    "typeshed_client": "jsonargparse[signatures]",
    "sklearn": "scikit-learn",
    "torchvision": "torchvision",
}
#: Callback hooks that check the configuration against the module and Trainer (their
#: ``ValueError`` is a configuration error, not a failure of training).
FIT_START_HOOKS = ("setup", "on_fit_start", "on_train_start")


def missing_extra_modules() -> list[str]:
    """The distributions of the ``recipes`` extra whose modules cannot be found."""
    missing = []
    for module, distribution in EXTRA_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is broken, or sys.modules[module] is None
            found = False
        if not found and distribution not in missing:
            missing.append(distribution)
    return missing


def require_extra() -> None:
    """Exit with a message naming the extra to install when part of it is missing."""
    missing = missing_extra_modules()
    if missing:
        sys.stderr.write(
            f"error: chaos-train needs the '{EXTRA}' extra of chaos_callbacks "
            f"(missing: {', '.join(missing)}). Install it with:\n"
            f"    pip install 'chaos_callbacks[{EXTRA}]'\n"
        )
        raise SystemExit(1)


# jsonargparse resolves a short class name among the imported subclasses of the expected type
# and lists them in --help: import every callback (chaos_callbacks imports them lazily).
CALLBACKS: tuple[type[Callback], ...] = tuple(getattr(chaos_callbacks, name) for name in chaos_callbacks.__all__)


class ConfigurationError(ValueError):
    """An error while instantiating the configured classes, described by :func:`describe`."""


class ChaosArgumentParser(LightningArgumentParser):
    """Puts the class and argument at fault first in jsonargparse's error messages, and prints a
    one-line usage instead of the few hundred lines of every Trainer option."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(lead_with_culprit(message), ex)

    def print_usage(self, file: Any = None) -> None:
        self._print_message(f"usage: {self.prog} [--config CONFIG] [--print_config] [options]\n", file)


_CLASS_PROBLEM = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)':\s*\n(?P<block>(?:[ \t]+.*\n?)+)")
_KEY_PROBLEM = re.compile(r'\s*Parser key "(?P<key>[^"]+)":\s*\n\s*(?P<why>.+)')
_UNKNOWN_OPTION = re.compile(r"\s*Option '(?P<key>[^']+)' is not accepted")


def lead_with_culprit(message: str) -> str:
    """Prefix a jsonargparse error with ``<Class>: <argument>: <why>`` when it is about one
    argument of a class given by ``class_path`` (a callback, a data module), which jsonargparse
    reports several lines down, under the union of types it tried."""
    match = _CLASS_PROBLEM.search(message)
    if match is None:
        return message
    owner = match["path"].rsplit(".", 1)[-1]
    block = match["block"]
    if key := _KEY_PROBLEM.match(block):
        summary = f"{owner}: {key['key']}: {key['why'].strip()}"
    elif unknown := _UNKNOWN_OPTION.match(block):
        summary = f"{owner}: {unknown['key']} is not an argument of {owner}{_accepted(match['path'])}"
    else:
        summary = f"{owner}: {block.strip().splitlines()[0]}"
    return f"{summary}\n\nDetails: {message}"


def _accepted(class_path: str) -> str:
    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(sys.modules[module], name)).parameters
    except (KeyError, AttributeError, TypeError, ValueError):
        return ""
    names = [p for p in parameters if p not in ("self", "args", "kwargs")]
    return f" (accepted: {', '.join(names)})" if names else f" ({name} takes no arguments)"


class ChaosCLI(LightningCLI):
    """LightningCLI over :class:`ClassificationModule` and any recipe data module."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("parser_mode", _legacy.PARSER_MODE)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"}})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_shape", "model.in_shape", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (default: the command line) after rewriting old class paths."""
        if args is None or isinstance(args, list):
            self.config = parser.parse_args(_legacy.upgrade_args(sys.argv[1:] if args is None else args))
        else:
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; any error here is one of the configuration (nothing
        has run yet), re-raised as a :class:`ConfigurationError`."""
        try:
            super().instantiate_classes()
        except (ValueError, RuntimeError, MisconfigurationException) as error:
            raise ConfigurationError(describe(error)) from error


def describe(error: Exception) -> str:
    """The message of the first ``ValueError`` in ``error``'s chain (jsonargparse wraps a
    constructor's error in its report of every type it tried), prefixed with ``<Class>: ``
    unless it starts that way; the class is that of the outermost constructor in the traceback
    (``DigitsDataModule`` when its base class rejected ``batch_size``)."""
    while isinstance(error.__cause__ or error.__context__, ValueError):
        error = error.__cause__ or error.__context__
    message = str(error)
    if re.match(r"\w+: ", message):
        return message
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(
            owner, (Callback, LightningModule, LightningDataModule, Trainer)
        ):
            return f"{type(owner).__name__}: {message}"
    return message


def is_fit_start_check(error: ValueError) -> bool:
    """Whether ``error`` was raised by a callback's fit-start configuration check."""
    return any(
        frame.f_code.co_name in FIT_START_HOOKS and isinstance(frame.f_locals.get("self"), Callback)
        for frame, _ in traceback.walk_tb(error.__traceback__)
    )


def run(args: ArgsType = None) -> ChaosCLI:
    """Run the CLI and return it (``args`` as a list for programmatic use; default ``sys.argv``).

    Raises ``SystemExit(2)`` after an ``error: <Class>: <argument> ...`` line on stderr for a
    configuration error (unless ``JSONARGPARSE_DEBUG`` is set, which re-raises it), and
    ``SystemExit(1)`` naming the ``recipes`` extra when part of it is not installed.
    """
    require_extra()
    _legacy.register_loader()
    try:
        return ChaosCLI(
            ClassificationModule,
            ImageClassificationDataModule,
            subclass_mode_data=True,
            parser_class=ChaosArgumentParser,
            parser_kwargs={"prog": "chaos-train"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except ValueError as error:
        if os.environ.get("JSONARGPARSE_DEBUG") or not (
            isinstance(error, ConfigurationError) or is_fit_start_check(error)
        ):
            raise
        sys.stderr.write(f"error: {describe(error)}\n")
        raise SystemExit(2) from error


def main() -> None:
    """The ``chaos-train`` console script (returns nothing, so the exit status is 0 on success)."""
    run()


if __name__ == "__main__":
    main()
