"""Old class paths of the recipes, accepted by ``chaos-train`` for one version.

Up to 0.1.0 the recipes were a top-level package, ``recipes`` (``recipes.data.MNISTDataModule``,
``recipes.module.ClassificationModule``, ...). They now live in :mod:`chaos_callbacks.recipes`;
no top-level ``recipes`` package is installed (the name is a common one). The CLI rewrites the
old paths, in config files and on the command line, before jsonargparse resolves them, and
warns once per path with a :class:`LegacyClassPathWarning`. Nothing is imported under the old
name, so another project's ``recipes`` package is never touched.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

OLD_PACKAGE = "recipes"
NEW_PACKAGE = "chaos_callbacks.recipes"
MODULES = ("cli", "data", "models", "module")
REMOVED_IN = "0.3.0"
#: The parser mode of ``chaos-train``: YAML, with old class paths rewritten.
PARSER_MODE = "chaos_yaml"

_OLD_CLASS_PATH = re.compile(rf"{OLD_PACKAGE}\.(?:{'|'.join(MODULES)})\.\w+")


class LegacyClassPathWarning(DeprecationWarning):
    """An old ``recipes.<module>.<Class>`` path was rewritten to ``chaos_callbacks.recipes...``.

    A :class:`DeprecationWarning` that the CLI shows by default (plain ones are hidden outside
    ``__main__``, and a config's author is the one who has to act on it).
    """


warnings.simplefilter("default", LegacyClassPathWarning)


def upgrade_path(path: str) -> str:
    """Return ``path`` with ``recipes.`` replaced by ``chaos_callbacks.recipes.`` (warning) when it
    is an old class path ``recipes.<module>.<Name>``, ``<module>`` one of :data:`MODULES`;
    anything else (``chaos_callbacks.recipes.data.X``, ``myrecipes.data.X``) unchanged."""
    if not _OLD_CLASS_PATH.fullmatch(path):
        return path
    new = f"{NEW_PACKAGE}{path[len(OLD_PACKAGE):]}"
    warnings.warn(
        f"class path {path!r} is deprecated and will stop working in {REMOVED_IN}: use {new!r} "
        "(the recipes moved into the chaos_callbacks package)",
        LegacyClassPathWarning,
        stacklevel=2,
    )
    return new


def upgrade(value: Any) -> Any:
    """Rewrite old class paths in a loaded config: ``class_path`` entries of dicts at any depth
    and list items (``callbacks: [recipes...]``)."""
    if isinstance(value, dict):
        return {key: upgrade_path(item) if key == "class_path" and isinstance(item, str) else upgrade(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [upgrade_path(item) if isinstance(item, str) else upgrade(item) for item in value]
    return value


def upgrade_args(args: list[str]) -> list[str]:
    """Rewrite old class paths given on the command line: ``--data recipes.data.X``,
    ``--data=recipes.data.X``, ``--trainer.callbacks+=...`` (config files and JSON/YAML values
    are rewritten as they are loaded, :func:`register_loader`)."""
    upgraded = []
    for arg in args:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        upgraded.append(f"{option}{equals}{upgrade_path(value)}")
    return upgraded


def register_loader() -> None:
    """Register :data:`PARSER_MODE`: jsonargparse's YAML loader followed by :func:`upgrade`."""
    import yaml
    from jsonargparse import get_loader, set_loader

    yaml_load = get_loader("yaml")

    def load(text: str) -> Any:
        return upgrade(yaml_load(text))

    set_loader(PARSER_MODE, load, exceptions=(yaml.YAMLError,))
