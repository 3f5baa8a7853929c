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

The norm and clipping kernels (``global_norm``, ``tensor_norms``, ``clip_by_global_norm_``,
``clip_by_norm_``, ``clip_by_value_``, ``adaptive_clip_``) are those of :mod:`optcore.clip`,
re-exported here; :func:`accumulate_` is the gradient-accumulation pass.
"""
import math

import numpy as np

from optcore import _checks as ck
from optcore import _rules
from optcore._kernels import _batchnorm as _bn
from optcore._kernels import _norms, _transforms
from optcore._kernels._runtime import TensorList
from optcore.clip import (
    adaptive_clip_,
    clip_by_global_norm_,
    clip_by_norm_,
    clip_by_value_,
    global_norm,
    tensor_norms,
)

__all__ = [
    "sgd_", "adagrad_", "rmsprop_", "adam_", "adamax_", "nadam_",
    "global_norm", "tensor_norms", "clip_by_global_norm_", "clip_by_norm_",
    "clip_by_value_", "adaptive_clip_", "accumulate_", "ema_update_", "max_norm_",
    "batchnorm_forward", "batchnorm_inference", "batchnorm_backward",
    "batchnorm_inference_backward",
    "global_norm", "tensor_norms", "clip_by_global_norm_", "clip_by_norm_",
    "clip_by_value_", "adaptive_clip_", "accumulate_",
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


def accumulate_(acc, grad, *, first=False):
    r"""Gradient accumulation in place, in one pass: ``acc += grad`` (``acc = grad`` when
    ``first``).

    .. math::
        a \leftarrow \begin{cases} g & \text{first} \\ a + g & \text{otherwise} \end{cases}

    Parameters
    ----------
    acc : ndarray or list of ndarray
        float32 C-contiguous accumulators, updated in place.
    grad : ndarray or list of ndarray
        The micro-batch gradients (read only), same sizes.
    first : bool
        Overwrite instead of adding (the first micro-batch of a window), so the accumulator
        never needs zeroing.

    References
    ----------
    ``optax.MultiSteps``; Keras ``gradient_accumulation_steps``.
    """
    ck.boolean("first", first)
    accs = ck.array_list("acc", acc)
    grads = ck.array_list("grad", grad, writeable=False)
    ck.same_sizes("acc", accs, "grad", grads)
    ck.no_overlap({"acc": accs, "grad": grads})
    _norms.accumulate(TensorList([accs, grads]), 1, 0, first)


# ---- batch normalization -------------------------------------------------------------------

BN_LAYOUTS = ("NC", "NCHW", "NHWC")


def _bn_geometry(x, layout):
    """Return ``(rows, C, S, planar)`` of ``x`` in ``layout`` (see ``_batchnorm.pyx``)."""
    if not isinstance(layout, str) or layout not in BN_LAYOUTS:
        raise ValueError(f"layout must be one of {BN_LAYOUTS}, got {layout!r}")
    if layout == "NC":
        if x.ndim != 2:
            raise ValueError(f"layout 'NC' expects x of shape (N, C), got shape {x.shape}")
        rows, C, S, planar = x.shape[0], x.shape[1], 1, False
    elif x.ndim < 3:
        raise ValueError(
            f"layout {layout!r} expects x with spatial dimensions "
            f"({'(N, C, H, W)' if layout == 'NCHW' else '(N, H, W, C)'}), got shape {x.shape}"
        )
    elif layout == "NCHW":
        rows, C, S, planar = x.shape[0], x.shape[1], int(np.prod(x.shape[2:])), True
    else:
        C = x.shape[-1]
        rows, S, planar = x.size // C if C else 0, 1, False
    if x.size == 0:
        raise ValueError(f"x must not be empty, got shape {x.shape}")
    return int(rows), int(C), int(S), planar


def _bn_channel(name, v, C, *, writeable=False, allow_float64=False):
    """Check a per-channel vector: a 1-D C-contiguous array of C elements."""
    if allow_float64 and isinstance(v, np.ndarray):
        if v.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must have dtype float64 or float32, got {v.dtype}")
        if v.ndim != 1 or v.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {v.shape}")
        return v
    ck.float32_buffer(name, v, writeable=writeable)
    if v.ndim != 1 or v.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {v.shape}")
    return v


def _bn_out(name, out, x):
    """Check an output buffer shaped like ``x``; allocate one when ``out`` is None."""
    if out is None:
        return np.empty_like(x)
    ck.float32_buffer(name, out)
    if out.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {out.shape}")
    return out


def _bn_vec_out(name, v, C):
    if v is None:
        return np.empty(C, dtype=np.float32)
    return _bn_channel(name, v, C, writeable=True)


def _bn_no_alias(outputs, inputs):
    """Check that no output shares memory with another output or with any input."""
    outs = [(k, a) for k, a in outputs.items() if a is not None]
    ins = [(k, a) for k, a in inputs.items() if a is not None]
    for i, (k, a) in enumerate(outs):
        for k2, b in outs[i + 1:] + ins:
            if a.size and b.size and np.may_share_memory(a, b):
                raise ValueError(f"{k} and {k2} share memory; each output buffer must be distinct")


def _bn_eps(eps):
    return ck.in_range("eps", eps, 0.0, np.inf, lo_open=True, hi_open=True)


def _bn_split(mean):
    """The float32 shift ``hi`` nearest the float64 ``mean`` and the float64 rest
    ``mean - hi``, which the callers fold into their per-channel constants."""
    hi = mean.astype(np.float32)
    return hi, mean - hi


def batchnorm_forward(x, gamma, beta, *, eps=1e-5, layout="NC", out=None, running_mean=None,
                      running_var=None, momentum=0.1):
    r"""Batch normalization in training mode: normalize with the batch statistics.

    For each channel :math:`c`, over the :math:`n` values of that channel (the batch and, for
    4-D layouts, the spatial positions):

    .. math::
        \mu_c = \frac1n \sum_i x_{ic},\qquad
        \sigma_c^2 = \frac1n \sum_i (x_{ic} - \mu_c)^2,\qquad
        r_c = \frac{1}{\sqrt{\sigma_c^2 + \epsilon}},\qquad
        y_{ic} = \gamma_c\,(x_{ic} - \mu_c)\,r_c + \beta_c

    The variance is the biased one (divided by :math:`n`), as in the paper and torch. When
    ``running_mean`` and ``running_var`` are given they are updated in place as torch does,
    with the unbiased variance:

    .. math::
        \hat\mu_c \leftarrow (1 - m)\,\hat\mu_c + m\,\mu_c,\qquad
        \hat\sigma_c^2 \leftarrow (1 - m)\,\hat\sigma_c^2 + m\,\frac{n}{n - 1}\,\sigma_c^2

    with :math:`m` = ``momentum``.

    Parameters
    ----------
    x : ndarray
        C-contiguous float32 input, read only. ``layout`` gives its meaning: ``"NC"`` an
        ``(N, C)`` matrix (after a dense layer); ``"NCHW"`` ``(N, C, *spatial)``;
        ``"NHWC"`` channels-last ``(N, *spatial, C)`` (a torch ``channels_last`` tensor
        permuted to ``(N, H, W, C)``).
    gamma, beta : ndarray of shape (C,) or None
        Scale and shift (float32, read only; views of a :class:`~optcore.Parameters` arena
        work). ``None`` when the normalization is not affine: scale 1, shift 0.
    eps : float
        Added to the variance, > 0.
    layout : {"NC", "NCHW", "NHWC"}
    out : ndarray, optional
        Where to write ``y`` (float32, shape of ``x``, must not share memory with any input);
        allocated when omitted.
    running_mean, running_var : ndarray of shape (C,), optional
        float32 running statistics, updated in place (give both or neither).
    momentum : float in [0, 1]
        Weight of the batch statistic in the running update (torch's convention).

    Returns
    -------
    y : ndarray
        The normalized output (``out`` when given).
    mean, invstd : ndarray of shape (C,), float64
        :math:`\mu` and :math:`r`, saved for :func:`batchnorm_backward`. Kept in float64 so that
        the backward pass centers ``x`` as accurately as the forward pass.

    Raises
    ------
    TypeError, ValueError
        Wrong dtype, non-contiguous or read-only output, a channel count that does not match,
        a single value per channel (``n == 1``: no batch statistics), ``eps <= 0``,
        ``momentum`` outside [0, 1], or an output sharing memory with an input. Nothing is
        written then.

    Notes
    -----
    Statistics are accumulated in float64 from float32 partial sums of at most 16 terms,
    around a shift (the channel's first value; taken again around the mean found when the shift
    lies more than 4 standard deviations away), and ``y`` is formed as
    :math:`(x - \mu_{hi})\,a + (\beta - \mu_{lo}\,a)` with :math:`\mu_{hi}` the float nearest
    :math:`\mu` (so :math:`x - \mu_{hi}` is exact near the mean), :math:`\mu_{lo} = \mu -
    \mu_{hi}` and :math:`a = \gamma r`, the constants computed in float64. So a channel with
    mean :math:`10^4` and standard deviation :math:`10^{-2}` is normalized to :math:`10^{-4}`
    of a float64 computation, where ``x * a + b`` in float32 is off by about 0.06. Results are
    bitwise identical for any number of threads.

    Examples
    --------
    >>> import numpy as np
    >>> from optcore.kernels import batchnorm_forward
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> y, mean, invstd = batchnorm_forward(x, None, None)
    >>> mean
    array([3., 4.])

    References
    ----------
    Ioffe, Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015; ``torch.nn.functional.batch_norm``.
    """
    ck.float32_buffer("x", x, writeable=False)
    rows, C, S, planar = _bn_geometry(x, layout)
    if gamma is not None:
        _bn_channel("gamma", gamma, C)
    if beta is not None:
        _bn_channel("beta", beta, C)
    eps = _bn_eps(eps)
    momentum = ck.in_range("momentum", momentum, 0.0, 1.0)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        _bn_channel("running_mean", running_mean, C, writeable=True)
        _bn_channel("running_var", running_var, C, writeable=True)
    n = rows * S
    if n < 2:
        raise ValueError(
            f"expected more than 1 value per channel in training mode, got x of shape "
            f"{x.shape} ({layout}); use batchnorm_inference for a single sample"
        )
    y = _bn_out("out", out, x)
    _bn_no_alias({"out": y, "running_mean": running_mean, "running_var": running_var},
                 {"x": x, "gamma": gamma, "beta": beta})
    mean = np.empty(C)
    var = np.empty(C)
    _bn.stats(x.reshape(-1), rows, C, S, planar, mean, var)
    invstd = 1.0 / np.sqrt(var + eps)
    a = invstd if gamma is None else gamma * invstd
    hi, rest = _bn_split(mean)
    b = -rest * a if beta is None else beta - rest * a
    _bn.apply(x.reshape(-1), rows, C, S, planar, hi, a.astype(np.float32), b.astype(np.float32),
              y.reshape(-1))
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
        running_var[...] = (1.0 - momentum) * running_var + momentum * (var * (n / (n - 1)))
    return y, mean, invstd


def _bn_inference_coefs(gamma, beta, running_mean, running_var, eps):
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    a = invstd if gamma is None else gamma * invstd
    b = -running_mean * a if beta is None else beta - running_mean * a
    return invstd, a.astype(np.float32), b.astype(np.float32)


def batchnorm_inference(x, gamma, beta, running_mean, running_var, *, eps=1e-5, layout="NC",
                        out=None):
    r"""Batch normalization in inference mode: one fused sweep ``y = x * a + b``.

    .. math::
        a_c = \frac{\gamma_c}{\sqrt{\hat\sigma_c^2 + \epsilon}},\qquad
        b_c = \beta_c - \hat\mu_c\, a_c,\qquad y_{ic} = x_{ic}\, a_c + b_c

    with :math:`\hat\mu, \hat\sigma^2` the running statistics. :math:`a, b` are computed in
    float64 and rounded to float32 once; the sweep reads ``x`` once and writes ``y`` once (the
    copy bandwidth pattern). This is the same affine map that
    :meth:`optcore.BatchNorm.fold_into` folds into the previous layer, and the one torch
    uses; like it, it loses accuracy when :math:`|\hat\mu| \gg \hat\sigma`.

    Parameters
    ----------
    x : ndarray
        float32 input, C-contiguous, in ``layout`` (see :func:`batchnorm_forward`). A batch of
        one is fine.
    gamma, beta : ndarray of shape (C,) or None
        float32 scale and shift, or None when not affine.
    running_mean, running_var : ndarray of shape (C,)
        float32 running statistics (read only).
    eps : float
        > 0.
    layout : {"NC", "NCHW", "NHWC"}
    out : ndarray, optional
        float32 output shaped like ``x`` that shares no memory with an input.

    Returns
    -------
    y : ndarray

    References
    ----------
    Ioffe, Szegedy, ICML 2015, algorithm 2; ``torch.nn.functional.batch_norm`` with
    ``training=False``.
    """
    ck.float32_buffer("x", x, writeable=False)
    rows, C, S, planar = _bn_geometry(x, layout)
    if gamma is not None:
        _bn_channel("gamma", gamma, C)
    if beta is not None:
        _bn_channel("beta", beta, C)
    _bn_channel("running_mean", running_mean, C)
    _bn_channel("running_var", running_var, C)
    eps = _bn_eps(eps)
    y = _bn_out("out", out, x)
    _bn_no_alias({"out": y}, {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                              "running_var": running_var})
    _, a, b = _bn_inference_coefs(gamma, beta, running_mean, running_var, eps)
    _bn.apply(x.reshape(-1), rows, C, S, planar, None, a, b, y.reshape(-1))
    return y


def _bn_backward_buffers(dy, x, gamma, layout, dx, dgamma, dbeta):
    ck.float32_buffer("dy", dy, writeable=False)
    ck.float32_buffer("x", x, writeable=False)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    geometry = _bn_geometry(x, layout)
    C = geometry[1]
    if gamma is not None:
        _bn_channel("gamma", gamma, C)
    elif dgamma is not None or dbeta is not None:
        raise ValueError("dgamma and dbeta are only computed for an affine normalization "
                         "(gamma given); pass gamma or leave them None")
    dx = _bn_out("dx", dx, x)
    if gamma is not None:
        dgamma = _bn_vec_out("dgamma", dgamma, C)
        dbeta = _bn_vec_out("dbeta", dbeta, C)
    return geometry, dx, dgamma, dbeta


def batchnorm_backward(dy, x, gamma, mean, invstd, *, layout="NC", dx=None, dgamma=None,
                       dbeta=None):
    r"""Gradient of :func:`batchnorm_forward` (training mode): two sweeps over memory.

    With :math:`\hat x_{ic} = (x_{ic} - \mu_c)\, r_c` and :math:`n` values per channel, the
    first sweep reads ``dy`` and ``x`` once for both sums, the second writes ``dx``:

    .. math::
        \frac{\partial L}{\partial \beta_c} = \sum_i dy_{ic},\qquad
        \frac{\partial L}{\partial \gamma_c} = r_c \sum_i dy_{ic}\,(x_{ic} - \mu_c)

    .. math::
        dx_{ic} = \gamma_c\, r_c \left(dy_{ic}
            - \frac1n \frac{\partial L}{\partial \beta_c}
            - \hat x_{ic}\, \frac1n \frac{\partial L}{\partial \gamma_c}\right)

    Parameters
    ----------
    dy, x : ndarray
        float32, C-contiguous, same shape, in ``layout``: the output gradient and the input of
        the forward pass (read only).
    gamma : ndarray of shape (C,) or None
        The scale (float32); None when not affine (scale 1; ``dgamma``/``dbeta`` are then
        neither computed nor accepted).
    mean, invstd : ndarray of shape (C,)
        As returned by :func:`batchnorm_forward` (float64; float32, e.g. torch's saved
        statistics, is accepted too).
    layout : {"NC", "NCHW", "NHWC"}
    dx : ndarray, optional
        float32 output shaped like ``x``; allocated when omitted.
    dgamma, dbeta : ndarray of shape (C,), optional
        float32 outputs, overwritten (not accumulated): e.g. ``params.grads["bn1.weight"]``
        views of a :class:`~optcore.Parameters` gradient arena. Allocated when omitted.

    Returns
    -------
    dx, dgamma, dbeta : ndarray
        ``dgamma`` and ``dbeta`` are None when ``gamma`` is None.

    Raises
    ------
    TypeError, ValueError
        As :func:`batchnorm_forward`; also when an output shares memory with any other buffer.
        Nothing is written then.

    References
    ----------
    Ioffe, Szegedy, ICML 2015, section 3; the gradient torch's
    ``native_batch_norm_backward`` computes.
    """
    (rows, C, S, planar), dx, dgamma, dbeta = _bn_backward_buffers(dy, x, gamma, layout, dx,
                                                                   dgamma, dbeta)
    mean = _bn_channel("mean", mean, C, allow_float64=True)
    invstd = _bn_channel("invstd", invstd, C, allow_float64=True)
    _bn_no_alias({"dx": dx, "dgamma": dgamma, "dbeta": dbeta},
                 {"dy": dy, "x": x, "gamma": gamma, "mean": mean, "invstd": invstd})
    mean = mean.astype(np.float64)
    invstd = invstd.astype(np.float64)
    n = rows * S
    hi, rest = _bn_split(mean)
    sum_dy = np.empty(C)
    sum_dy_xmu = np.empty(C)
    _bn.backward_sums(dy.reshape(-1), x.reshape(-1), rows, C, S, planar, hi, sum_dy, sum_dy_xmu)
    sum_dy_xmu -= rest * sum_dy  # sums of dy * (x - hi) -> dy * (x - mean)
    g = invstd if gamma is None else gamma * invstd
    k2 = g * invstd * invstd * (sum_dy_xmu / n)
    k3 = g * (sum_dy / n) - rest * k2  # (x - mean) * k2 = (x - hi) * k2 - rest * k2
    _bn.dx(dy.reshape(-1), x.reshape(-1), rows, C, S, planar, hi, g.astype(np.float32),
           k2.astype(np.float32), k3.astype(np.float32), dx.reshape(-1))
    if gamma is not None:
        dgamma[...] = sum_dy_xmu * invstd
        dbeta[...] = sum_dy
    return dx, dgamma, dbeta


def batchnorm_inference_backward(dy, x, gamma, running_mean, running_var, *, eps=1e-5,
                                 layout="NC", dx=None, dgamma=None, dbeta=None):
    r"""Gradient of :func:`batchnorm_inference` (frozen statistics, e.g. fine-tuning).

    With :math:`r_c = 1/\sqrt{\hat\sigma_c^2 + \epsilon}` constant:

    .. math::
        dx_{ic} = \gamma_c\, r_c\, dy_{ic},\qquad
        \frac{\partial L}{\partial \gamma_c} = r_c \sum_i dy_{ic}\,(x_{ic} - \hat\mu_c),\qquad
        \frac{\partial L}{\partial \beta_c} = \sum_i dy_{ic}

    ``dx`` is one sweep (``dy`` read, ``dx`` written); the two sums, only when ``gamma`` is
    given, are one more read of ``dy`` and ``x``. Arguments are as in
    :func:`batchnorm_backward`, with the running statistics (float32, read only) and ``eps``
    in place of ``mean`` and ``invstd``.

    Returns
    -------
    dx, dgamma, dbeta : ndarray
        ``dgamma`` and ``dbeta`` are None when ``gamma`` is None.

    References
    ----------
    Ioffe, Szegedy, ICML 2015; torch's ``batch_norm`` backward with ``training=False``.
    """
    (rows, C, S, planar), dx, dgamma, dbeta = _bn_backward_buffers(dy, x, gamma, layout, dx,
                                                                   dgamma, dbeta)
    _bn_channel("running_mean", running_mean, C)
    _bn_channel("running_var", running_var, C)
    eps = _bn_eps(eps)
    _bn_no_alias({"dx": dx, "dgamma": dgamma, "dbeta": dbeta},
                 {"dy": dy, "x": x, "gamma": gamma, "running_mean": running_mean,
                  "running_var": running_var})
    invstd, a, _ = _bn_inference_coefs(gamma, None, running_mean, running_var, eps)
    if gamma is not None:
        sum_dy = np.empty(C)
        sum_dy_xmu = np.empty(C)
        _bn.backward_sums(dy.reshape(-1), x.reshape(-1), rows, C, S, planar, running_mean,
                          sum_dy, sum_dy_xmu)
    _bn.apply(dy.reshape(-1), rows, C, S, planar, None, a, np.zeros(C, np.float32),
              dx.reshape(-1))
    if gamma is not None:
        dgamma[...] = sum_dy_xmu * invstd
        dbeta[...] = sum_dy
    return dx, dgamma, dbeta
