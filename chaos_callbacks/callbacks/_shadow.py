"""Run the user's code a second time without touching the module's own Python state.

A diagnostic that re-runs ``training_step`` (or a ``loss_fn``) runs *all* of the user's code:
``self.training_step_outputs.append(loss)``, counters, caches, a ``torch.Generator`` kept on the
module. :func:`shadow` builds a stand-in of the module tree for that re-run:

- every ``nn.Module`` becomes a new object of the same class whose ``_parameters`` and
  ``_buffers`` hold the *same* tensors (gradients flow to the real parameters; in-place buffer
  updates such as batch-norm statistics land in the real buffers, which
  :func:`~chaos_callbacks.callbacks._plumbing.no_harm` restores);
- every other attribute is a copy: containers (``list``, ``dict``, ``set``, ``deque``, …) are
  copied recursively, tensors kept directly as attributes are cloned, ``torch.Generator`` states
  are copied, bound methods of a module are re-bound to its shadow, other objects are copied
  (``copy.copy``, then their attributes the same way, recursively);
- framework objects the module merely refers to (the Trainer, data modules, loggers,
  optimizers, data loaders, datasets, callbacks) and tensors inside containers are shared;
- ``torch.compile``: an ``OptimizedModule`` is replaced by the shadow of its eager original, and
  the compiled ``forward``/``*_step`` that ``Trainer.fit(torch.compile(module))`` installs on the
  instance (``_compiler_ctx``) are dropped, so the re-run is eager (aot_autograd has no double
  backward).

The real module is never written, whatever ``training_step`` does to ``self``. What no shadow can
cover: closures and hooks that captured the real module (they act on it, e.g. torchmetrics'
wrapped ``update``, whose states ``no_harm`` restores separately), in-place changes to tensors held
inside containers, module-level globals, files, and calls to external services or loggers.
"""

from __future__ import annotations

import collections
import copy
import enum
import types
from typing import Any

import torch
from torch import Tensor, nn

_ATOMIC = (
    type(None), bool, int, float, complex, str, bytes, range, slice, type, enum.Enum, torch.dtype, torch.device,
    types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
)
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")
_ATOMIC_EXACT = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device})
_PLAIN_DICTS = frozenset({dict, collections.OrderedDict})


def _shared_types() -> tuple[type, ...]:
    """Framework objects a module refers to without owning them."""
    from lightning.fabric import Fabric
    from lightning.pytorch import Callback, LightningDataModule, Trainer
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, Dataset

    return (Trainer, Fabric, LightningDataModule, Logger, Callback, torch.optim.Optimizer,
            torch.optim.lr_scheduler.LRScheduler, DataLoader, Dataset)


class _Copier:
    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}
        self.shared = _shared_types()

    def module(self, module: nn.Module) -> nn.Module:
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            return self.module(module._orig_mod)
        if id(module) in self.memo:
            return self.memo[id(module)]
        clone = object.__new__(type(module))
        self.memo[id(module)] = clone
        state = dict(module.__dict__)
        if "_compiler_ctx" in state:
            for name in _COMPILED_METHODS:
                state.pop(name, None)
        for key, value in state.items():
            if key == "_modules":
                state[key] = type(value)((n, None if m is None else self.module(m)) for n, m in value.items())
            elif key in ("_parameters", "_buffers"):
                state[key] = type(value)(value)
            elif isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                state[key] = value.clone() if value.requires_grad else value.detach().clone()
            else:
                state[key] = self.value(value)
        clone.__dict__.update(state)
        return clone

    def value(self, value: Any) -> Any:
        kind = type(value)
        if kind in _ATOMIC_EXACT:  # the common leaves, without the isinstance chain
            return value
        if kind in _PLAIN_DICTS and not value:  # the many empty hook dicts of every module
            clone = self.memo.get(id(value))
            if clone is None:
                clone = self.memo[id(value)] = value.copy()
            return clone
        if isinstance(value, _ATOMIC) or isinstance(value, Tensor) or isinstance(value, self.shared):
            return value
        if isinstance(value, nn.Module):
            return self.module(value)
        if id(value) in self.memo:
            return self.memo[id(value)]
        if isinstance(value, types.MethodType):
            owner = value.__self__
            if isinstance(owner, nn.Module):
                return types.MethodType(value.__func__, self.module(owner))
            return value
        if isinstance(value, torch.Generator):
            clone = torch.Generator(device=value.device)
            clone.set_state(value.get_state())
        elif isinstance(value, (list, collections.deque)):
            clone = copy.copy(value)
            self.memo[id(value)] = clone
            items = [self.value(v) for v in value]
            clone.clear()
            clone.extend(items)
        elif isinstance(value, dict):
            clone = copy.copy(value)
            self.memo[id(value)] = clone
            for k, v in list(value.items()):
                clone[k] = self.value(v)
        elif isinstance(value, (set, frozenset, tuple)) and type(value) in (set, frozenset, tuple):
            clone = type(value)(self.value(v) for v in value)
        else:
            try:
                clone = copy.copy(value)
            except Exception:  # uncopyable (locks, file handles, C objects): shared
                return value
            self.memo[id(value)] = clone
            attributes = getattr(clone, "__dict__", None)
            if isinstance(attributes, dict) and attributes is not getattr(value, "__dict__", None):
                for key, item in list(attributes.items()):
                    attributes[key] = self.value(item)
        self.memo[id(value)] = clone
        return clone


def shadow(module: nn.Module) -> nn.Module:
    """A stand-in of ``module`` sharing its parameters and buffers and copying all its other state."""
    return _Copier().module(module)
