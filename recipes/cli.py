"""``chaos-train``: the LightningCLI entry point of the recipes.

    chaos-train fit --config configs/quickstart.yaml
    chaos-train fit --config configs/mnist_mlp_chaos.yaml --trainer.max_epochs 5
    chaos-train fit --config configs/quickstart.yaml --trainer.strategy ddp --trainer.devices 2

The model's ``num_classes`` and ``in_shape`` are linked from the chosen data module.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

from recipes.data import ImageClassificationDataModule
from recipes.module import ClassificationModule


class ChaosCLI(LightningCLI):
    """LightningCLI over :class:`ClassificationModule` and any :mod:`recipes.data` data module."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_shape", "model.in_shape", apply_on="instantiate")


def run(args: ArgsType = None) -> ChaosCLI:
    """Run the CLI and return it (``args`` as a list for programmatic use; default ``sys.argv``)."""
    return ChaosCLI(
        ClassificationModule,
        ImageClassificationDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """The ``chaos-train`` console script (returns nothing, so the exit status is 0 on success)."""
    run()


if __name__ == "__main__":
    main()
