r"""The fused update kernels as functions, one per rule.

Each function updates ``param`` and the state buffers in place in one sweep over memory,
reading the gradient once, multiplied on the fly by ``grad_scale`` (so that clipping and loss
unscaling cost no extra pass). Every array argument is a C-contiguous float32 ndarray, or a
list of them (one kernel call then updates all tensors); matching entries must have the same
number of elements and no two buffers may share memory. Inputs are checked before anything is
written: a rejected call changes nothing.

The formulas are those documented by ``torch.optim``; scalars that depend on the step are
computed in float64. Every rule also takes ``l1`` (default 0): after the update, in the same
sweep, the proximal step of an L1 penalty :math:`\ell_1 \lVert p \rVert_1`,

.. math::
    p \leftarrow \operatorname{sign}(p)\,\max(|p| - \eta\,\ell_1,\ 0)

which sets small weights to exact zeros (with plain SGD this is ISTA, the proximal gradient
method for the lasso). L2 stays ``weight_decay``.

Beside the rules, every other kernel of optcore is re-exported here from the module of its
family: the norms and clipping of :mod:`optcore.clip` (``global_norm``, ``tensor_norms``,
``clip_by_global_norm_``, ``clip_by_norm_``, ``clip_by_value_``, ``adaptive_clip_``), the
gradient-accumulation pass :func:`accumulate_` (:mod:`optcore.scaling`), the parameter average
:func:`ema_update_` (:mod:`optcore.ema`), the max-norm constraint :func:`max_norm_`
(:mod:`optcore.constraints`) and the batch-norm kernels (``batchnorm_forward``,
``batchnorm_inference``, ``batchnorm_backward``, ``batchnorm_inference_backward``).
"""
from optcore import _checks as ck
from optcore import _rules
from optcore._batchnorm_functions import (
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_inference,
    batchnorm_inference_backward,
)
from optcore._kernels._runtime import TensorList
from optcore.clip import (
    adaptive_clip_,
    clip_by_global_norm_,
    clip_by_norm_,
    clip_by_value_,
    global_norm,
    tensor_norms,
)
from optcore.constraints import max_norm_
from optcore.ema import ema_update_
from optcore.scaling import accumulate_

__all__ = [
    "sgd_", "adagrad_", "rmsprop_", "adam_", "adamax_", "nadam_",
    "global_norm", "tensor_norms", "clip_by_global_norm_", "clip_by_norm_",
    "clip_by_value_", "adaptive_clip_", "accumulate_", "ema_update_", "max_norm_",
    "batchnorm_forward", "batchnorm_inference", "batchnorm_backward",
    "batchnorm_inference_backward",
]


def _apply(rule, h, step, param, grad, states, grad_scale, scalars=None, *, needs_step=True):
    rule.check(h)
    h = _rules.plain(h)
    if needs_step:
        step = ck.positive_int("step", step)
    grad_scale = ck.finite("grad_scale", grad_scale)
    params = ck.array_list("param", param)
    grads = ck.array_list("grad", grad, writeable=False)
    ck.same_sizes("param", params, "grad", grads)
    named = {"param": params, "grad": grads}
    slots = [params, grads, None]
    for sname in rule.state_names(h):
        if sname is None:
            slots.append(None)
            continue
        if states.get(sname) is None:
            raise TypeError(f"{sname} is required with these hyper-parameters")
        arrays = ck.array_list(sname, states[sname])
        ck.same_sizes("param", params, sname, arrays)
        named[sname] = arrays
        slots.append(arrays)
    ck.no_overlap(named)
    go = _rules.grad_opts(lr=h["lr"], weight_decay=h["weight_decay"], decoupled=rule.decoupled(h),
                          maximize=h["maximize"], grad_scale=grad_scale, l1=h["l1"])
    rule.run(TensorList(slots), go, h, step, {} if scalars is None else scalars)


def _betas(beta1, beta2):
    """Check ``beta1``, ``beta2`` in [0, 1) under their own names; return the pair."""
    return (ck.in_range("beta1", beta1, 0.0, 1.0, hi_open=True),
            ck.in_range("beta2", beta2, 0.0, 1.0, hi_open=True))


def sgd_(param, grad, momentum_buffer=None, *, step, lr=1e-3, momentum=0.0, dampening=0.0,
         nesterov=False, weight_decay=0.0, maximize=False, grad_scale=1.0, l1=0.0):
    r"""Stochastic gradient descent with momentum, in place.

    .. math::
        g &= s\,\nabla + \lambda p \\
        b &= \begin{cases} g & t = 1 \\ \mu b + (1 - \tau) g & t > 1 \end{cases} \\
        p &= p - \eta\,(g + \mu b \text{ if nesterov else } b)

    with :math:`s` = ``grad_scale`` (negated when ``maximize``), :math:`\lambda` =
    ``weight_decay``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``, :math:`\eta`
    = ``lr``. Without momentum, :math:`p = p - \eta g` and no buffer is needed.

    Parameters
    ----------
    param, grad : ndarray or list of ndarray
        Parameters (updated) and gradients (read only).
    momentum_buffer : ndarray or list of ndarray, optional
        Required when ``momentum > 0``; initialised from the gradient at ``step == 1``.
    step : int
        1-based step number.

    References
    ----------
    Sutskever et al., "On the importance of initialization and momentum in deep learning",
    ICML 2013; ``torch.optim.SGD``.
    """
    h = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
             nesterov=nesterov, maximize=maximize, l1=l1)
    _apply(_rules.SGDRule, h, step, param, grad, {"momentum_buffer": momentum_buffer}, grad_scale)


def adagrad_(param, grad, sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
             maximize=False, grad_scale=1.0, l1=0.0):
    r"""AdaGrad, in place.

    .. math::
        g = s\,\nabla + \lambda p,\quad \tilde\eta = \frac{\eta}{1 + (t - 1)\,\delta},\quad
        S = S + g^2,\quad p = p - \tilde\eta\,\frac{g}{\sqrt{S} + \epsilon}

    with :math:`\delta` = ``lr_decay``.

    References
    ----------
    Duchi, Hazan, Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization", JMLR 2011; ``torch.optim.Adagrad``.
    """
    h = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=0.0,
             eps=eps, maximize=maximize, l1=l1)
    _apply(_rules.AdaGradRule, h, step, param, grad, {"sum": sum}, grad_scale)


def rmsprop_(param, grad, square_avg, grad_avg=None, momentum_buffer=None, *, lr=1e-2,
             alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             maximize=False, grad_scale=1.0, l1=0.0):
    r"""RMSProp, in place.

    .. math::
        g &= s\,\nabla + \lambda p,\qquad v = \alpha v + (1 - \alpha) g^2 \\
        \bar g &= \alpha \bar g + (1 - \alpha) g \ \text{(centered)},\qquad
        d = \sqrt{v - \bar g^2} + \epsilon \ \text{(centered, else } \sqrt{v} + \epsilon) \\
        b &= \mu b + g / d,\ p = p - \eta b \ \text{if } \mu > 0 \text{ else } p = p - \eta g / d

    ``grad_avg`` is required when ``centered``, ``momentum_buffer`` when ``momentum > 0``.
    A centered variance that rounding pushes below zero is taken as zero.

    References
    ----------
    Hinton, Srivastava, Swersky, "Neural Networks for Machine Learning", lecture 6e, 2012;
    Graves, "Generating Sequences With Recurrent Neural Networks", 2013 (centered);
    ``torch.optim.RMSprop``.
    """
    h = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
             centered=centered, maximize=maximize, l1=l1)
    states = {"square_avg": square_avg, "grad_avg": grad_avg, "momentum_buffer": momentum_buffer}
    _apply(_rules.RMSPropRule, h, None, param, grad, states, grad_scale, needs_step=False)


def adam_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3, beta1=0.9,
          beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, maximize=False,
          grad_scale=1.0, l1=0.0):
    r"""Adam (AdamW with ``decoupled=True``; AMSGrad when ``max_exp_avg_sq`` is given), in place.

    .. math::
        g &= s\,\nabla + \lambda p \ \text{(coupled)},\qquad p = (1 - \eta\lambda)\,p \
            \text{(decoupled)} \\
        m &= \beta_1 m + (1 - \beta_1) g,\qquad v = \beta_2 v + (1 - \beta_2) g^2,\qquad
        \hat v = \max(\hat v, v) \ \text{(AMSGrad)} \\
        p &= p - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    (with :math:`\hat v` in place of :math:`v` for AMSGrad). The bias corrections are computed
    in float64; :math:`\epsilon` is added outside the square root, as in torch.

    References
    ----------
    Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; Loshchilov, Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019; Reddi, Kale, Kumar, "On the
    Convergence of Adam and Beyond", ICLR 2018; ``torch.optim.Adam``, ``torch.optim.AdamW``.
    """
    h = dict(lr=lr, betas=_betas(beta1, beta2), eps=eps, weight_decay=weight_decay,
             amsgrad=max_exp_avg_sq is not None, maximize=maximize,
             decoupled_weight_decay=ck.boolean("decoupled", decoupled), l1=l1)
    states = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq}
    _apply(_rules.AdamRule, h, step, param, grad, states, grad_scale)


def adamax_(param, grad, exp_avg, exp_inf, *, step, lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.0, maximize=False, grad_scale=1.0, l1=0.0):
    r"""AdaMax (Adam with the infinity norm), in place.

    .. math::
        g = s\,\nabla + \lambda p,\quad m = \beta_1 m + (1 - \beta_1) g,\quad
        u = \max(\beta_2 u, |g| + \epsilon),\quad p = p - \frac{\eta}{1 - \beta_1^t}\frac{m}{u}

    References
    ----------
    Kingma, Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, section 7.1;
    ``torch.optim.Adamax``.
    """
    h = dict(lr=lr, betas=_betas(beta1, beta2), eps=eps, weight_decay=weight_decay,
             maximize=maximize, l1=l1)
    _apply(_rules.AdaMaxRule, h, step, param, grad, {"exp_avg": exp_avg, "exp_inf": exp_inf},
           grad_scale)


def nadam_(param, grad, exp_avg, exp_avg_sq, *, step, mu_product=1.0, lr=2e-3, beta1=0.9,
           beta2=0.999, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, decoupled=False,
           maximize=False, grad_scale=1.0, l1=0.0):
    r"""NAdam (Adam with Nesterov momentum), in place; returns the new ``mu_product``.

    .. math::
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right),\qquad
        \Pi_t = \textstyle\prod_{i \le t} \mu_i \\
        m &= \beta_1 m + (1 - \beta_1) g,\qquad v = \beta_2 v + (1 - \beta_2) g^2,\qquad
        d = \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        p &= p - \eta \frac{1 - \mu_t}{1 - \Pi_t} \frac{g}{d}
               - \eta \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m}{d}

    with :math:`\psi` = ``momentum_decay``. Pass ``mu_product`` = :math:`\Pi_{t-1}` (1.0 at
    the first step) and keep the returned :math:`\Pi_t` for the next call; it is a float64
    scalar.

    References
    ----------
    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop;
    ``torch.optim.NAdam``.
    """
    h = dict(lr=lr, betas=_betas(beta1, beta2), eps=eps, weight_decay=weight_decay,
             momentum_decay=momentum_decay,
             decoupled_weight_decay=ck.boolean("decoupled", decoupled), maximize=maximize,
             l1=l1)
    scalars = {"mu_product": ck.in_range("mu_product", mu_product, 0.0, 1.0)}
    _apply(_rules.NAdamRule, h, step, param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
           grad_scale, scalars)
    return scalars["mu_product"]
