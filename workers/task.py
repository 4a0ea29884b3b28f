"""The user's parts of a run, built from the config's ``_target_`` nodes (Hydra's convention).

=============  ======================================================================================
``model``      any ``nn.Module`` class (or factory function); the other keys are its keyword arguments
``data``       a function returning ``(train, eval)`` map-style datasets of ``(input, target)`` pairs
               (eval may be None); keys besides the loader's own (``config.DATA_KEYS``) are passed to it
``loss``       ``(outputs, targets) -> scalar``: a class is constructed with the keys
               (``torch.nn.MSELoss``), a function is called per batch with them
``metrics``    name -> like ``loss``, a batch mean, or None when the metric does not apply to this task
``optimizer``  any ``torch.optim`` optimizer class; ``lr`` is the schedule's peak
=============  ======================================================================================

Targets import from the working directory and ``PYTHONPATH``. :func:`check` runs in the launcher
before any rank starts: every target imports, is callable and accepts its keys (cheap: it imports
modules and reads signatures, it builds nothing), else :class:`TaskError` naming the key.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from workers.config import DATA_KEYS, OPTIMIZER_KEYS, Config, kwargs


class TaskError(ValueError):
    """A `_target_` that does not import, is not callable or does not take its keys; names the key."""


def locate(path: str, key: str) -> Any:
    """Import ``pkg.module.Name`` (the longest importable module prefix, then attributes)."""
    if os.getcwd() not in sys.path and "" not in sys.path:  # a console script's sys.path lacks the cwd
        sys.path.insert(0, os.getcwd())
    parts = path.split(".")
    module, error = None, None
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:cut]).startswith(e.name):  # a missing import inside it
                raise TaskError(f"{key}._target_={path}: importing it failed: {e}") from None
            error = e
        except Exception as e:  # the module itself raised while importing
            raise TaskError(f"{key}._target_={path}: importing {'.'.join(parts[:cut])} raised "
                            f"{type(e).__name__}: {e}") from None
    if module is None:
        raise TaskError(f"{key}._target_={path}: no module {parts[0]!r} ({error}). HINT: run from the directory "
                        "that holds it or add it to PYTHONPATH") from None
    obj: Any = module
    for i, name in enumerate(parts[cut:], cut):
        if not hasattr(obj, name):
            raise TaskError(f"{key}._target_={path}: {'.'.join(parts[:i])} has no attribute {name!r}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise TaskError(f"{key}._target_={path} is a {type(obj).__name__}, not a class or function")
    return obj


def _check_keys(fn: Callable, key: str, path: str, keys: dict[str, Any], *positional: Any) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        sig.bind_partial(*positional, **keys)
    except TypeError as e:
        takes = ", ".join(p for p in list(sig.parameters)[len(positional):])
        raise TaskError(f"{key}: {path}: {e} (it takes: {takes}). HINT: fix or drop that {key}.* key") from None


def _node(cfg: Config, key: str) -> tuple[str, dict[str, Any]]:
    node = cfg.metrics[key.split(".", 1)[1]] if key.startswith("metrics.") else getattr(cfg, key)
    own = DATA_KEYS if key == "data" else OPTIMIZER_KEYS if key == "optimizer" else ()
    return node["_target_"], kwargs(node, own)


def _nodes(cfg: Config) -> Iterable[str]:
    yield from ("model", "data", "loss", "optimizer")
    yield from (f"metrics.{name}" for name in cfg.metrics)


def check(cfg: Config, skip: Iterable[str] = ()) -> None:
    """Plan-time check of every target: imports, is callable, accepts its keys. Then the model is built on
    the meta device (shapes only, no memory: a 70B model costs what a small one does) and loss/metric
    classes are constructed, so a constructor that raises is caught here too. Data is not loaded.
    ``skip``: nodes known to pass (built-in presets as shipped, launcher/config/hydra.py ``_shipped``); when that is
    all of them, nothing is imported (torch neither)."""
    keys = [key for key in _nodes(cfg) if key not in skip]
    if not keys:
        return
    import torch

    for key in keys:
        path, keys = _node(cfg, key)
        fn = locate(path, key)
        # an optimizer takes the parameters first; a per-batch function takes (outputs, targets) first
        positional = (None,) if key == "optimizer" else ()
        _check_keys(fn, key, path, keys, *positional)
        if key == "model" or (key.startswith(("loss", "metrics.")) and inspect.isclass(fn)):
            try:
                with torch.device("meta"):
                    fn(**keys)
            except Exception as e:
                where = " (built on the meta device, before any rank starts)" if key == "model" else ""
                raise TaskError(f"{key}: {path}(**{keys}) raised {type(e).__name__}: {e}{where}") from None


def _per_batch(fn: Callable, keys: dict[str, Any]) -> Callable:
    """A loss/metric: a class is constructed with the keys; a function gets them on every call."""
    return fn(**keys) if inspect.isclass(fn) else functools.partial(fn, **keys)


def build_model(cfg: Config) -> Any:
    path, keys = _node(cfg, "model")
    return locate(path, "model")(**keys)


def build_data(cfg: Config) -> tuple[Any, Any]:
    path, keys = _node(cfg, "data")
    out = locate(path, "data")(**keys)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TaskError(f"data._target_={path} returned {type(out).__name__}: expected (train, eval) datasets "
                        "(eval may be None)")
    return out


def build_loss(cfg: Config) -> Callable:
    path, keys = _node(cfg, "loss")
    return _per_batch(locate(path, "loss"), keys)


def build_metrics(cfg: Config) -> dict[str, Callable]:
    out = {}
    for name in cfg.metrics:
        path, keys = _node(cfg, f"metrics.{name}")
        out[name] = _per_batch(locate(path, f"metrics.{name}"), keys)
    return out


def build_optimizer(cfg: Config, model: Any, world_size: int, device_type: str) -> Any:
    """The optimizer over two parameter groups: weight decay on weight matrices only (not on norms,
    biases or embeddings, unless ``optimizer.decay_norms_and_biases``); fused kernels on CUDA."""
    import torch

    path, keys = _node(cfg, "optimizer")
    cls = locate(path, "optimizer")
    keys["lr"] = peak_lr(cfg, world_size)
    if "fused" in inspect.signature(cls).parameters and device_type == "cuda" and "fused" not in keys:
        keys["fused"] = True
    decay = float(keys.get("weight_decay", 0.0) or 0.0)
    if decay and not cfg.optimizer.get("decay_norms_and_biases", False):
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in embeddings]},
                  {"params": [p for p in params if p.dim() < 2 or id(p) in embeddings], "weight_decay": 0.0}]
        return cls([g for g in groups if g["params"]], **keys)
    return cls([p for p in model.parameters() if p.requires_grad], **keys)


def peak_lr(cfg: Config, world_size: int) -> float:
    # The linear scaling rule is opt-in: silently changing the LR with the world size surprises people.
    lr = float(cfg.optimizer["lr"])
    return lr * world_size if cfg.optimizer.get("scale_lr_with_world_size", False) else lr
