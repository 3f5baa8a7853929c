"""The update rules: hyper-parameter checks, float64 step scalars and the kernel call.

Shared by the public kernels (``optcore.kernels``) and the optimizer classes
(``optcore.optim``), so both compute exactly the same thing. Formulas follow the
``torch.optim`` documentation; step-dependent scalars (bias corrections, NAdam's momentum
schedule, AdaGrad's decayed rate) are computed here in float64 and handed to the float32
kernel once per call.
"""
import math
from numbers import Real

import numpy as np

from optcore import _checks as ck
from optcore._kernels import _optim


def grad_opts(*, lr, weight_decay, decoupled, maximize, grad_scale, tensor_scale=None,
              clamp=math.inf, l1=0.0):
    """How the kernel reads the gradient (see oc_optim.h)."""
    scale = -grad_scale if maximize else grad_scale
    if decoupled:
        return _optim.GradOpts(scale, tensor_scale, clamp, 0.0, 1.0 - lr * weight_decay, lr * l1)
    return _optim.GradOpts(scale, tensor_scale, clamp, weight_decay, 1.0, lr * l1)


def plain(h):
    """Return ``h`` with NumPy scalars as Python bools/floats (pairs as tuples of floats), so
    that the step scalars are computed in float64 whatever scalar type the user passed
    (NumPy 2 keeps ``np.float32(lr) / 0.1`` in float32)."""
    out = {}
    for k, v in h.items():
        if type(v) is float:  # the common case, without the abstract-class checks below
            out[k] = v
        elif isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (tuple, list)) and all(type(x) is float or isinstance(x, Real)
                                                  for x in v):
            out[k] = tuple(float(x) for x in v)
        elif isinstance(v, Real):
            out[k] = float(v)
        else:  # not a hyper-parameter of the rule (e.g. a tag a user put in param_groups)
            out[k] = v
    return out


def check_common(h):
    ck.nonnegative("lr", h["lr"])
    ck.nonnegative("weight_decay", h["weight_decay"])
    ck.nonnegative("l1", h["l1"])
    ck.boolean("maximize", h["maximize"])


def check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    ck.in_range("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    ck.in_range("betas[1]", betas[1], 0.0, 1.0, hi_open=True)


# State buffers that never hold a negative value: stored with the unsigned 8-bit code.
NONNEGATIVE_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "exp_inf"})


class Rule:
    """One update rule: its defaults, state buffers and kernel call."""

    name = ""
    defaults = {}
    scalar_names = ()  # float64 scalar state kept after the first step, in [0, 1]

    @staticmethod
    def check(h):
        """Raise TypeError/ValueError naming the first bad hyper-parameter in ``h``."""
        raise NotImplementedError

    @staticmethod
    def state_names(h):
        """Names of the state buffers this configuration uses, in slot order (3, 4, 5)."""
        raise NotImplementedError

    @staticmethod
    def initial_state(h):
        """Initial value of each state buffer."""
        return {}

    @staticmethod
    def decoupled(h):
        return False

    @staticmethod
    def run(tl, go, h, step, scalars):
        """Apply step number ``step`` (1-based). ``scalars`` is the rule's float64 scalar state
        (e.g. NAdam's momentum product), updated in place."""
        raise NotImplementedError


class SGDRule(Rule):
    name = "sgd"
    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False, l1=0.0)

    @staticmethod
    def check(h):
        check_common(h)
        ck.nonnegative("momentum", h["momentum"])
        ck.finite("dampening", h["dampening"])
        ck.boolean("nesterov", h["nesterov"])
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")

    @staticmethod
    def state_names(h):
        return ["momentum_buffer"] if h["momentum"] != 0 else []

    @staticmethod
    def run(tl, go, h, step, scalars):
        _optim.sgd(tl, go, h["lr"], h["momentum"], h["dampening"], h["nesterov"], step == 1)


class AdaGradRule(Rule):
    name = "adagrad"
    defaults = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                    eps=1e-10, maximize=False, l1=0.0)

    @staticmethod
    def check(h):
        check_common(h)
        ck.nonnegative("lr_decay", h["lr_decay"])
        ck.nonnegative("initial_accumulator_value", h["initial_accumulator_value"])
        ck.nonnegative("eps", h["eps"])

    @staticmethod
    def state_names(h):
        return ["sum"]

    @staticmethod
    def initial_state(h):
        return {"sum": h["initial_accumulator_value"]}

    @staticmethod
    def run(tl, go, h, step, scalars):
        clr = h["lr"] / (1.0 + (step - 1) * h["lr_decay"])
        _optim.adagrad(tl, go, clr, h["eps"])


class RMSPropRule(Rule):
    name = "rmsprop"
    defaults = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False, l1=0.0)

    @staticmethod
    def check(h):
        check_common(h)
        ck.in_range("alpha", h["alpha"], 0.0, 1.0)
        ck.nonnegative("eps", h["eps"])
        ck.nonnegative("momentum", h["momentum"])
        ck.boolean("centered", h["centered"])

    @staticmethod
    def state_names(h):
        names = ["square_avg", "grad_avg" if h["centered"] else None]
        if h["momentum"] > 0:
            names.append("momentum_buffer")
        return names

    @staticmethod
    def run(tl, go, h, step, scalars):
        _optim.rmsprop(tl, go, h["lr"], h["alpha"], h["eps"], h["momentum"], h["centered"])


class AdamRule(Rule):
    name = "adam"
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    maximize=False, decoupled_weight_decay=False, l1=0.0)

    @staticmethod
    def check(h):
        check_common(h)
        check_betas(h["betas"])
        ck.nonnegative("eps", h["eps"])
        ck.boolean("amsgrad", h["amsgrad"])
        ck.boolean("decoupled_weight_decay", h["decoupled_weight_decay"])

    @staticmethod
    def state_names(h):
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if h["amsgrad"] else [])

    @staticmethod
    def decoupled(h):
        return h["decoupled_weight_decay"]

    @staticmethod
    def run(tl, go, h, step, scalars):
        beta1, beta2 = h["betas"]
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        _optim.adam(tl, go, h["lr"] / bc1, beta1, beta2, math.sqrt(bc2), h["eps"])


class AdamWRule(AdamRule):
    name = "adamw"
    defaults = dict(AdamRule.defaults, weight_decay=1e-2, decoupled_weight_decay=True)

    @staticmethod
    def check(h):
        AdamRule.check(h)
        if not h["decoupled_weight_decay"]:
            raise ValueError("AdamW always decouples weight decay (decoupled_weight_decay must "
                             "stay True); use Adam for coupled L2 weight decay")


class AdaMaxRule(Rule):
    name = "adamax"
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                    l1=0.0)

    @staticmethod
    def check(h):
        check_common(h)
        check_betas(h["betas"])
        ck.nonnegative("eps", h["eps"])

    @staticmethod
    def state_names(h):
        return ["exp_avg", "exp_inf"]

    @staticmethod
    def run(tl, go, h, step, scalars):
        beta1, beta2 = h["betas"]
        _optim.adamax(tl, go, h["lr"] / (1.0 - beta1**step), beta1, beta2, h["eps"])


class NAdamRule(Rule):
    name = "nadam"
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                    momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, l1=0.0)
    scalar_names = ("mu_product",)

    @staticmethod
    def check(h):
        check_common(h)
        check_betas(h["betas"])
        ck.nonnegative("eps", h["eps"])
        ck.nonnegative("momentum_decay", h["momentum_decay"])
        ck.boolean("decoupled_weight_decay", h["decoupled_weight_decay"])

    @staticmethod
    def state_names(h):
        return ["exp_avg", "exp_avg_sq"]

    @staticmethod
    def decoupled(h):
        return h["decoupled_weight_decay"]

    @staticmethod
    def run(tl, go, h, step, scalars):
        beta1, beta2 = h["betas"]
        psi = h["momentum_decay"]
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        mu_product = scalars.get("mu_product", 1.0) * mu
        lr = h["lr"]
        coef_g = lr * (1.0 - mu) / (1.0 - mu_product)
        coef_m = lr * mu_next / (1.0 - mu_product * mu_next)
        _optim.nadam(tl, go, coef_g, coef_m, beta1, beta2, 1.0 - beta2**step, h["eps"])
        scalars["mu_product"] = mu_product


RULES = {r.name: r for r in (SGDRule, AdaGradRule, RMSPropRule, AdamRule, AdamWRule, AdaMaxRule, NAdamRule)}
