"""optcore for PyTorch: ``torch.optim`` drop-ins, gradient clipping and batch-norm modules that
run optcore's kernels on the tensors' own memory.

Low precision: every optimizer takes ``state_dtype="float32" | "bfloat16" | "int8"``
(``Adam8bit`` / ``AdamW8bit`` default to 8-bit state), bfloat16/float16 parameters with
``rounding=`` and ``compensation=``, and float32 master weights with a 16-bit ``model_copy=``
(see :mod:`optcore.torch.optim` and :doc:`/low_precision`).

Imported only as ``optcore.torch`` (``import optcore`` never imports torch). Tested with
torch 2.13.0 (CPU build).
"""
try:
    import torch as _torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "optcore.torch needs PyTorch; install it with pip install 'optcore[torch]' "
        "(optcore is tested with torch==2.13.0, CPU build)",
        name="torch",
    ) from exc

from optcore.torch.clip import (  # noqa: E402
    clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm,
)
from optcore.torch.optim import (  # noqa: E402
    SGD, Adagrad, Adam, Adam8bit, Adamax, AdamW, AdamW8bit, NAdam, RMSprop,
)
from optcore.torch.batchnorm import (  # noqa: E402
    BatchNorm1d,
    BatchNorm2d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    convert_batchnorm,
)

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam",
           "Adam8bit", "AdamW8bit",
           "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm",
           "BatchNorm1d", "BatchNorm2d", "BatchNormReLU1d", "BatchNormReLU2d",
           "convert_batchnorm"]
