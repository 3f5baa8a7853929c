"""Batch-normalization kernels as functions (re-exported by :mod:`optcore.kernels`).

The loops are in ``_kernels/oc_batchnorm.h``; this module validates, allocates outputs and
dispatches.
"""
import numpy as np

from optcore import _checks as ck
from optcore._kernels import _batchnorm as _bn

__all__ = ["batchnorm_forward", "batchnorm_inference", "batchnorm_backward",
           "batchnorm_inference_backward"]

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


def _bn_inputs(x, gamma, beta, layout):
    """Check ``x`` and the optional affine vectors; return ``(rows, C, S, planar)``."""
    ck.float32_buffer("x", x, writeable=False)
    geometry = _bn_geometry(x, layout)
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v is not None:
            _bn_channel(name, v, geometry[1])
    return geometry


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


def _bn_activation(activation):
    """Check ``activation`` (None or "relu"); return whether ReLU is fused."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def _bn_mask(y, x, relu):
    """Check the forward output ``y`` a fused-ReLU backward masks with; None without ReLU."""
    if not relu:
        if y is not None:
            raise ValueError("y (the forward output) is only used with activation='relu'")
        return None
    if y is None:
        raise ValueError("activation='relu' needs y, the output of the forward pass")
    ck.float32_buffer("y", y, writeable=False)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
    return y


def batchnorm_forward(x, gamma, beta, *, eps=1e-5, layout="NC", out=None, running_mean=None,
                      running_var=None, momentum=0.1, activation=None):
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

    with :math:`m` = ``momentum``. With ``activation="relu"`` the same sweep writes
    :math:`\max(y_{ic}, 0)` (batch norm followed by ReLU, one sweep less than the pair).

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
    activation : {None, "relu"}
        Fuse a ReLU into the output sweep: ``y = max(y, 0)`` (``y > 0`` decides, so a NaN
        becomes 0). Pass the same value and ``y`` to :func:`batchnorm_backward`.

    Returns
    -------
    y : ndarray
        The normalized output (``out`` when given), after the activation.
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
    rows, C, S, planar = _bn_inputs(x, gamma, beta, layout)
    eps = _bn_eps(eps)
    momentum = ck.in_range("momentum", momentum, 0.0, 1.0)
    relu = _bn_activation(activation)
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
    mean, var, invstd = forward_unchecked(x, gamma, beta, (rows, C, S, planar), eps, y, relu)
    if running_mean is not None:
        update_running(running_mean, running_var, mean, var, n, momentum)
    return y, mean, invstd


def forward_unchecked(x, gamma, beta, geometry, eps, y, relu):
    """The training forward on checked buffers (``geometry`` from :func:`_bn_geometry`):
    writes ``y``, returns ``(mean, var, invstd)`` in float64. Shared with ``optcore.torch``."""
    rows, C, S, planar = geometry
    mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    _bn.train_forward(x.reshape(-1), rows, C, S, planar, gamma, beta, eps, y.reshape(-1), relu,
                      mean, var, invstd)
    return mean, var, invstd


def update_running(running_mean, running_var, mean, var, n, momentum):
    """torch's running update, in place: ``(1 - m) * running + m * batch`` with the unbiased
    variance ``var * n / (n - 1)``."""
    _bn.running_update(running_mean, running_var, mean, var, n, momentum)


def _bn_inference_coefs(gamma, beta, running_mean, running_var, eps):
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    a = invstd if gamma is None else gamma * invstd
    b = -running_mean * a if beta is None else beta - running_mean * a
    return invstd, a.astype(np.float32), b.astype(np.float32)


def batchnorm_inference(x, gamma, beta, running_mean, running_var, *, eps=1e-5, layout="NC",
                        out=None, activation=None):
    r"""Batch normalization in inference mode: one fused sweep ``y = x * a + b``.

    .. math::
        a_c = \frac{\gamma_c}{\sqrt{\hat\sigma_c^2 + \epsilon}},\qquad
        b_c = \beta_c - \hat\mu_c\, a_c,\qquad y_{ic} = x_{ic}\, a_c + b_c

    with :math:`\hat\mu, \hat\sigma^2` the running statistics. :math:`a, b` are computed in
    float64 and rounded to float32 once; the sweep reads ``x`` once and writes ``y`` once (the
    copy bandwidth pattern). This is the same affine map that
    :meth:`optcore.BatchNorm.fold_into` folds into the previous layer, and the one torch
    uses; like it, it loses accuracy when :math:`|\hat\mu| \gg \hat\sigma`. With
    ``activation="relu"`` the sweep writes :math:`\max(y_{ic}, 0)`.

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
    activation : {None, "relu"}
        Fuse a ReLU into the sweep (see :func:`batchnorm_forward`).

    Returns
    -------
    y : ndarray

    References
    ----------
    Ioffe, Szegedy, ICML 2015, algorithm 2; ``torch.nn.functional.batch_norm`` with
    ``training=False``.
    """
    geometry = _bn_inputs(x, gamma, beta, layout)
    _bn_channel("running_mean", running_mean, geometry[1])
    _bn_channel("running_var", running_var, geometry[1])
    eps = _bn_eps(eps)
    relu = _bn_activation(activation)
    y = _bn_out("out", out, x)
    _bn_no_alias({"out": y}, {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
                              "running_var": running_var})
    inference_unchecked(x, gamma, beta, running_mean, running_var, geometry, eps, y, relu)
    return y


def inference_unchecked(x, gamma, beta, running_mean, running_var, geometry, eps, y, relu):
    """The inference forward on checked buffers: writes ``y``. Shared with ``optcore.torch``."""
    rows, C, S, planar = geometry
    _, a, b = _bn_inference_coefs(gamma, beta, running_mean, running_var, eps)
    _bn.apply(x.reshape(-1), rows, C, S, planar, None, a, b, y.reshape(-1), relu)


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
                       dbeta=None, activation=None, y=None):
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

    With ``activation="relu"`` (the gradient of ``max(BN(x), 0)``), :math:`dy` is first
    replaced by :math:`dy_{ic}\,[y_{ic} > 0]` with :math:`y` the forward output, in both
    sweeps: no extra pass over memory, one less than ReLU's backward followed by this one.

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
    activation : {None, "relu"}
        The activation fused into the forward pass.
    y : ndarray, optional
        With ``activation="relu"``: the forward output (float32, shape of ``x``, read only),
        whose positive entries let the gradient through.

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
    mask = _bn_mask(y, x, _bn_activation(activation))
    _bn_no_alias({"dx": dx, "dgamma": dgamma, "dbeta": dbeta},
                 {"dy": dy, "x": x, "gamma": gamma, "mean": mean, "invstd": invstd, "y": mask})
    backward_unchecked(dy, x, gamma, mean.astype(np.float64), invstd.astype(np.float64),
                       (rows, C, S, planar), dx, dgamma, dbeta, mask)
    return dx, dgamma, dbeta


def backward_unchecked(dy, x, gamma, mean, invstd, geometry, dx, dgamma, dbeta, mask):
    """The training backward on checked buffers (``mean``, ``invstd`` float64; ``mask`` the
    fused-ReLU forward output or None): writes ``dx`` and, when given, ``dgamma``, ``dbeta``.
    Shared with ``optcore.torch``."""
    rows, C, S, planar = geometry
    _bn.train_backward(dy.reshape(-1), x.reshape(-1), None if mask is None else mask.reshape(-1),
                       rows, C, S, planar, gamma, mean, invstd,
                       None if dx is None else dx.reshape(-1), dgamma, dbeta)


def batchnorm_inference_backward(dy, x, gamma, running_mean, running_var, *, eps=1e-5,
                                 layout="NC", dx=None, dgamma=None, dbeta=None, activation=None,
                                 y=None):
    r"""Gradient of :func:`batchnorm_inference` (frozen statistics, e.g. fine-tuning).

    With :math:`r_c = 1/\sqrt{\hat\sigma_c^2 + \epsilon}` constant:

    .. math::
        dx_{ic} = \gamma_c\, r_c\, dy_{ic},\qquad
        \frac{\partial L}{\partial \gamma_c} = r_c \sum_i dy_{ic}\,(x_{ic} - \hat\mu_c),\qquad
        \frac{\partial L}{\partial \beta_c} = \sum_i dy_{ic}

    ``dx`` is one sweep (``dy`` read, ``dx`` written); the two sums, only when ``gamma`` is
    given, are one more read of ``dy`` and ``x``. Arguments are as in
    :func:`batchnorm_backward` (``activation="relu"`` with ``y`` masks :math:`dy` by
    :math:`y > 0`), with the running statistics (float32, read only) and ``eps`` in place of
    ``mean`` and ``invstd``.

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
    mask = _bn_mask(y, x, _bn_activation(activation))
    _bn_no_alias({"dx": dx, "dgamma": dgamma, "dbeta": dbeta},
                 {"dy": dy, "x": x, "gamma": gamma, "running_mean": running_mean,
                  "running_var": running_var, "y": mask})
    inference_backward_unchecked(dy, x, gamma, running_mean, running_var, (rows, C, S, planar),
                                 eps, dx, dgamma, dbeta, mask)
    return dx, dgamma, dbeta


def inference_backward_unchecked(dy, x, gamma, running_mean, running_var, geometry, eps, dx,
                                 dgamma, dbeta, mask):
    """The inference backward on checked buffers: writes ``dx`` and, when given, ``dgamma``,
    ``dbeta``. Shared with ``optcore.torch``."""
    rows, C, S, planar = geometry
    invstd, a, _ = _bn_inference_coefs(gamma, None, running_mean, running_var, eps)
    m = None if mask is None else mask.reshape(-1)
    if dgamma is not None or dbeta is not None:
        sum_dy = np.empty(C)
        sum_dy_xmu = np.empty(C)
        _bn.backward_sums(dy.reshape(-1), x.reshape(-1), rows, C, S, planar, running_mean,
                          sum_dy, sum_dy_xmu, m)
        if dgamma is not None:
            dgamma[...] = sum_dy_xmu * invstd
        if dbeta is not None:
            dbeta[...] = sum_dy
    if dx is not None:
        _bn.apply(dy.reshape(-1), rows, C, S, planar, None, a, np.zeros(C, np.float32),
                  dx.reshape(-1), False, m)
