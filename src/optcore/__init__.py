"""optcore: fused, in-place, multi-threaded float32 kernels for CPU training loops."""
from optcore._config import config, show_config
from optcore._kernels._runtime import (
    get_flush_denormal,
    get_num_threads,
    set_flush_denormal,
    set_num_threads,
)
from optcore import clip, distributed, init, kernels, scaling, schedules
from optcore.constraints import MaxNorm
from optcore.ema import EMA
from optcore.batchnorm import BatchNorm
from optcore.optim import (
    SGD,
    AdaGrad,
    Adagrad,
    AdaMax,
    Adam,
    Adam8bit,
    Adamax,
    AdamW,
    AdamW8bit,
    NAdam,
    Optimizer,
    RMSProp,
    RMSprop,
    StepResult,
)
from optcore.params import Parameters
from optcore.quasinewton import BFGS, LBFGS
from optcore.scaling import GradScaler

__version__ = "0.1.0"

__all__ = [
    "Parameters",
    "Optimizer",
    "SGD",
    "AdaGrad",
    "Adagrad",
    "RMSProp",
    "RMSprop",
    "Adam",
    "AdamW",
    "Adam8bit",
    "AdamW8bit",
    "AdaMax",
    "Adamax",
    "NAdam",
    "StepResult",
    "BFGS",
    "LBFGS",
    "GradScaler",
    "BatchNorm",
    "kernels",
    "schedules",
    "init",
    "EMA",
    "MaxNorm",
    "clip",
    "distributed",
    "scaling",
    "config",
    "show_config",
    "set_num_threads",
    "get_num_threads",
    "set_flush_denormal",
    "get_flush_denormal",
]
