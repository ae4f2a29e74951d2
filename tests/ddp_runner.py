"""Runs one DDP scenario: ``python -m tests.ddp_runner module:function OUT_DIR DEVICES``.

The scenario function takes the world size and returns ``(model, dataloader, callbacks,
collect, trainer_kwargs)``; ``collect(trainer, model, callbacks)`` returns a JSON-able dict that
each rank writes to ``OUT_DIR/rank<R>.json``. With DEVICES=1 it runs without DDP (the reference).
Lightning's process launcher re-runs this same command line for rank 1, hence the __main__ guard.
"""

import importlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl


def main() -> None:
    target, out_dir, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    module_name, fn_name = target.split(":")
    scenario = getattr(importlib.import_module(module_name), fn_name)
    pl.seed_everything(0, verbose=False)
    model, dataloader, callbacks, collect, trainer_kwargs = scenario(devices)
    kwargs = dict(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, dataloader)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(collect(trainer, model, callbacks)))


if __name__ == "__main__":
    main()
