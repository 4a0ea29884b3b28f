"""Int8 post-training quantization of ``nn.Linear`` layers through torchao (``pip install torchao``).

torchao is PyTorch's maintained quantization library; ``torch.ao.quantization`` (eager
``quantize_dynamic``) and TorchScript are deprecated. ``torchao.quantization.quantize_`` swaps each Linear's
weight for an int8 tensor subclass in place; the quantized module then goes through ``torch.export`` like
any other, and the saved program runs on the CPU (int8 matmuls via ``aten._int_mm``). Loading that program
needs torchao installed: its deserializer imports the tensor subclass.

Schemes:

``dynamic``      int8 weights and int8 activations quantized per token at run time (what
                 ``quantize_dynamic`` did; ``Int8DynamicActivationInt8WeightConfig``) — the default
``weight-only``  int8 weights, fp32 activations (``Int8WeightOnlyConfig``): a smaller file, fp32 arithmetic
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch

SCHEMES = ("dynamic", "weight-only")


class QuantizeError(RuntimeError):
    """Int8 quantization is not possible here (torchao missing); the message says what to install."""


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to ERROR for the block (and put them back after)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_torchao() -> Any:
    """``import torchao`` without its import-time noise on a CPU build of torch: a warning per CUDA kernel
    library it cannot load (``_C_mxfp8``, ``_C_cutlass_90a``, ...) and torch's notice about Enum pytree
    constants. Real errors still raise."""
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):
            import torchao
            import torchao.quantization  # noqa: F401  (registers the tensor subclasses an int8 program uses)
    except ImportError as e:
        raise QuantizeError(f"int8 quantization needs torchao ({e}). HINT: pip install 'torchao>=0.18' "
                            "(or pip install 'torch-launchpad[int8]')") from None
    return torchao


def linear_layers(model: torch.nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules (what gets quantized)."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def quantize_int8(model: torch.nn.Module, scheme: str = "dynamic") -> torch.nn.Module:
    """An int8 copy of ``model`` (left untouched): every ``nn.Linear`` weight quantized per output channel.

    Tied weights stay correct: a Linear sharing its weight with an Embedding (a GPT's head) gets an int8
    copy, the embedding keeps its fp32 table."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: expected one of {SCHEMES}")
    import_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Int8DynamicActivationInt8WeightConfig() if scheme == "dynamic" else Int8WeightOnlyConfig()
    qmodel = copy.deepcopy(model).eval()
    quantize_(qmodel, config)  # default filter: nn.Linear modules only
    return qmodel


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind a tensor subclass (an int8 weight's data and scales), or [t] for a plain one."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return [p for n in names for p in _plain_tensors(getattr(t, n))]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (int8 data + scales for quantized weights);
    shared tensors counted once."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        for p in _plain_tensors(t.data if isinstance(t, torch.nn.Parameter) else t):
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total
