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

Beside the rules: :func:`ema_update_` (exponential moving average of parameters) and
:func:`max_norm_` (the max-norm constraint), kernels of the ``_transforms`` family.
"""
import math

import numpy as np

from optcore import _checks as ck
from optcore import _rules
from optcore._kernels import _transforms
from optcore._kernels._runtime import TensorList

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_", "adamax_", "nadam_", "ema_update_", "max_norm_"]


def _apply(rule, h, step, param, grad, states, grad_scale, scalars=None):
    rule.check(h)
    if step is not None:
        ck.positive_int("step", step)
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
    _apply(_rules.RMSPropRule, h, None, param, grad, states, grad_scale)


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
    h = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
             amsgrad=max_exp_avg_sq is not None, maximize=maximize,
             decoupled_weight_decay=decoupled, l1=l1)
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
    h = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize,
             l1=l1)
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
    h = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
             momentum_decay=momentum_decay, decoupled_weight_decay=decoupled, maximize=maximize,
             l1=l1)
    scalars = {"mu_product": ck.in_range("mu_product", mu_product, 0.0, 1.0)}
    _apply(_rules.NAdamRule, h, step, param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
           grad_scale, scalars)
    return scalars["mu_product"]


def ema_update_(avg, param, decay):
    r"""Exponential moving average of parameters, in place: ``avg`` moves toward ``param``.

    .. math::
        a \leftarrow \beta\, a + (1 - \beta)\, p

    evaluated in float32 with :math:`1 - \beta` computed in float64; one sweep reading
    ``avg`` and ``param`` and writing ``avg`` (the memory traffic of a triad).

    Parameters
    ----------
    avg : ndarray or list of ndarray
        The averages (updated), C-contiguous float32.
    param : ndarray or list of ndarray
        The current parameters (read only), same sizes as ``avg``.
    decay : float
        :math:`\beta` in [0, 1]; 0 copies ``param``, 1 leaves ``avg`` unchanged.

    See Also
    --------
    optcore.EMA : keeps the average of a parameter arena, with warm-up, bias correction and
        swapping for evaluation.

    References
    ----------
    Polyak, Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992;
    ``optax.ema``; the update of ``torch.optim.swa_utils.get_ema_multi_avg_fn`` and Keras's
    ``use_ema`` (``ema_momentum`` is :math:`\beta`).

    Examples
    --------
    >>> import numpy as np, optcore
    >>> avg = np.zeros(3, np.float32); p = np.ones(3, np.float32)
    >>> optcore.kernels.ema_update_(avg, p, 0.75)
    >>> avg
    array([0.25, 0.25, 0.25], dtype=float32)
    """
    decay = ck.in_range("decay", decay, 0.0, 1.0)
    avgs = ck.array_list("avg", avg)
    params = ck.array_list("param", param, writeable=False)
    ck.same_sizes("avg", avgs, "param", params)
    ck.no_overlap({"avg": avgs, "param": params})
    _transforms.ema(TensorList([avgs, params]), decay)


def _max_norm_layout(shape, axis):
    """How :func:`max_norm_` sees a tensor of ``shape`` normed over ``axis``.

    Returns ``(units, k, rows)``: ``units`` vectors of ``k`` elements, stored as rows of a
    ``(units, k)`` matrix when ``rows`` else as columns of a ``(k, units)`` matrix. Raises
    ValueError when the axes are not a leading or trailing block of the dimensions.
    """
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("weight must have at least one dimension")
    axes = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    if not isinstance(axes, (tuple, list)) or not axes or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
    ):
        raise TypeError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")
    norm = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a weight with {ndim} dimensions")
        norm.append(int(a) % ndim)
    norm = sorted(set(norm))
    if len(norm) != len(axes):
        raise ValueError(f"axis has repeated entries: {axis!r}")
    j = len(norm)
    size = lambda dims: math.prod(int(d) for d in dims)
    if norm == list(range(ndim - j, ndim)):
        return size(shape[: ndim - j]), size(shape[ndim - j :]), True
    if norm == list(range(j)):
        return size(shape[j:]), size(shape[:j]), False
    raise ValueError(
        f"axis {axis!r} must be a leading block (0, 1, ...) or a trailing block (..., ndim-1) "
        f"of the {ndim} dimensions"
    )


def max_norm_(weight, max_value, axis=0):
    r"""Max-norm constraint, in place: rescale every unit whose incoming weight vector has an
    L2 norm above ``max_value``.

    For each unit :math:`u` with incoming weights :math:`w_u` (the entries of ``weight`` along
    ``axis``),

    .. math::
        w_u \leftarrow \begin{cases}
            w_u \,\dfrac{c}{\lVert w_u \rVert_2 + 10^{-7}} & \lVert w_u \rVert_2 > c \\
            w_u & \text{otherwise}
        \end{cases}

    with :math:`c` = ``max_value``: the factor of ``torch.renorm(w, 2, dim, c)``; units within
    the bound are untouched (bitwise). Norms are summed in float64 in a fixed order (bitwise
    identical for any thread count); the factor is applied in float32.

    ``axis`` names the axes the norm runs over (the *incoming* axes), as in Keras
    ``MaxNorm(max_value, axis)``:

    - dense weights ``(in, out)`` (``x @ w``): ``axis=0`` (the default), one norm per output
      unit;
    - conv weights ``(out, in, kh, kw)`` (torch layout): ``axis=(1, 2, 3)``;
    - torch ``Linear`` weights ``(out, in)``: ``axis=1``;
    - Keras conv kernels ``(kh, kw, in, out)``: ``axis=(0, 1, 2)``.

    The axes must be a leading or a trailing block of the dimensions.

    Parameters
    ----------
    weight : ndarray
        C-contiguous float32, updated in place.
    max_value : float
        :math:`c > 0`.
    axis : int or tuple of int, default 0

    References
    ----------
    Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 2014, section 5.1; Keras ``keras.constraints.MaxNorm``; ``torch.renorm``.

    Examples
    --------
    >>> import numpy as np, optcore
    >>> w = np.array([[3.0, 0.3], [4.0, 0.4]], np.float32)   # (in=2, out=2)
    >>> optcore.kernels.max_norm_(w, 1.0, axis=0)
    >>> np.linalg.norm(w, axis=0).round(5)
    array([1. , 0.5], dtype=float32)
    """
    weight = ck.float32_buffer("weight", weight)
    max_value = ck.in_range("max_value", max_value, 0.0, math.inf, lo_open=True, hi_open=True)
    units, k, rows = _max_norm_layout(weight.shape, axis)
    if weight.size:
        _transforms.max_norm(weight, units, k, rows, max_value)
