r"""Weight initializers that write in place into float32 arrays (e.g. ``params["w1"]``).

Every initializer draws from a zero-mean distribution of variance

.. math::
    \sigma^2 = \frac{g^2}{n}, \qquad n = \text{fan\_in},\ \text{fan\_out}\ \text{or}\
    \text{fan\_avg} = (\text{fan\_in} + \text{fan\_out}) / 2

with :math:`g` the ``gain``: a normal :math:`\mathcal N(0, \sigma^2)` or a uniform
:math:`\mathcal U(-\sqrt{3}\sigma, \sqrt{3}\sigma)`. The named initializers differ only in the
defaults (Géron, Hands-On Machine Learning, ch. 11, table 11-1):

============================  =========  ========================  ===========================
initializer                   fan        gain                      for
============================  =========  ========================  ===========================
Glorot / Xavier               fan_avg    1                         none, tanh, sigmoid, softmax
He / Kaiming                  fan_in     :math:`\sqrt 2`           ReLU and variants
LeCun                         fan_in     1                         SELU
============================  =========  ========================  ===========================

Fans are taken from the shape (see :func:`fans`): dense weights are ``(in, out)`` (the
``x @ w`` convention of NumPy and Keras), convolution weights ``(out, in, *kernel)`` (torch's
layout). Note that torch's ``nn.Linear`` stores ``(out, in)``: pass ``mode="fan_out"`` there,
or transpose.

Values come from a :class:`numpy.random.Generator` (``rng``: a Generator, an int seed, or None
for fresh entropy) and are generated directly into the target in float32, without a temporary
copy; the same seed gives the same weights.
"""
import math

import numpy as np

from optcore import _checks as ck

__all__ = [
    "calculate_gain",
    "fans",
    "variance_scaling_",
    "glorot_uniform_",
    "glorot_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "he_uniform_",
    "he_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "lecun_uniform_",
    "lecun_normal_",
]

_MODES = ("fan_in", "fan_out", "fan_avg")


def calculate_gain(nonlinearity, param=None):
    r"""The recommended gain for a nonlinearity, as ``torch.nn.init.calculate_gain``.

    ======================================  ===============================================
    nonlinearity                            gain
    ======================================  ===============================================
    linear, identity, conv*, sigmoid        1
    tanh                                    5/3
    relu                                    :math:`\sqrt 2`
    leaky_relu                              :math:`\sqrt{2 / (1 + a^2)}`, ``param`` = a
                                            (default 0.01)
    selu                                    3/4
    ======================================  ===============================================

    Parameters
    ----------
    nonlinearity : str
    param : float, optional
        The negative slope of ``leaky_relu``.
    """
    linear = ("linear", "identity", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "sigmoid")
    if not isinstance(nonlinearity, str):
        raise TypeError(f"nonlinearity must be a str, got {type(nonlinearity).__name__}")
    if nonlinearity != "leaky_relu" and param is not None:
        raise ValueError(f"param is only used with 'leaky_relu', not {nonlinearity!r}")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "selu":
        return 3.0 / 4.0
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else ck.finite("param", param)
        return math.sqrt(2.0 / (1.0 + slope**2))
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def fans(shape):
    """Return ``(fan_in, fan_out)`` for a weight of ``shape``.

    - ``(n,)``: both ``n``;
    - ``(in, out)``: dense weight of ``x @ w`` (NumPy / Keras convention);
    - ``(out, in, *kernel)``: convolution weight (torch layout), with the receptive field
      :math:`r = \\prod` kernel: ``fan_in = in * r``, ``fan_out = out * r``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("cannot compute fans of a scalar (0-d) weight")
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fan(shape, mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    fan_in, fan_out = fans(shape)
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]


def _generator(rng):
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def variance_scaling_(w, *, gain=1.0, mode="fan_in", distribution="normal", rng=None):
    r"""Fill ``w`` in place with zero-mean values of variance :math:`g^2 / n`.

    ``distribution="normal"`` draws :math:`\mathcal N(0, g^2/n)`; ``"uniform"`` draws
    :math:`\mathcal U(-b, b)` with :math:`b = g\sqrt{3/n}`. Keras ``VarianceScaling(scale=g**2,
    mode, distribution)`` (Keras's ``"truncated_normal"`` is not offered; its ``"fan_avg"`` is
    the same).

    Parameters
    ----------
    w : ndarray
        C-contiguous, writeable float32 array; overwritten.
    gain : float, default 1.0
        :math:`g > 0` (see :func:`calculate_gain`).
    mode : {"fan_in", "fan_out", "fan_avg"}, default "fan_in"
        :math:`n` (see :func:`fans` for the shape convention).
    distribution : {"normal", "uniform"}, default "normal"
    rng : numpy.random.Generator, int or None

    Returns
    -------
    ndarray
        ``w``.
    """
    w = ck.float32_buffer("w", w)
    gain = ck.in_range("gain", gain, 0.0, math.inf, lo_open=True, hi_open=True)
    n = _fan(w.shape, mode)
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")
    gen = _generator(rng)
    if w.size == 0:
        return w
    std = gain / math.sqrt(n)
    if distribution == "normal":
        gen.standard_normal(out=w.reshape(-1), dtype=np.float32)
        w *= np.float32(std)
    else:
        bound = math.sqrt(3.0) * std
        gen.random(out=w.reshape(-1), dtype=np.float32)
        w *= np.float32(2.0 * bound)
        w -= np.float32(bound)
    return w


def glorot_uniform_(w, *, gain=1.0, mode="fan_avg", rng=None):
    r"""Glorot/Xavier uniform: :math:`\mathcal U(-b, b)`, :math:`b = g\sqrt{6/(\text{fan\_in} +
    \text{fan\_out})}` with the default ``mode="fan_avg"``.

    ``torch.nn.init.xavier_uniform_``, Keras ``GlorotUniform``.

    References
    ----------
    Glorot, Bengio, "Understanding the difficulty of training deep feedforward neural
    networks", AISTATS 2010.
    """
    return variance_scaling_(w, gain=gain, mode=mode, distribution="uniform", rng=rng)


def glorot_normal_(w, *, gain=1.0, mode="fan_avg", rng=None):
    r"""Glorot/Xavier normal: :math:`\mathcal N(0, 2g^2/(\text{fan\_in} + \text{fan\_out}))`
    with the default ``mode="fan_avg"``.

    ``torch.nn.init.xavier_normal_``; Keras ``GlorotNormal`` uses a truncated normal of the
    same variance instead.

    References
    ----------
    Glorot, Bengio, AISTATS 2010.
    """
    return variance_scaling_(w, gain=gain, mode=mode, distribution="normal", rng=rng)


def he_uniform_(w, *, gain=math.sqrt(2.0), mode="fan_in", rng=None):
    r"""He/Kaiming uniform: :math:`\mathcal U(-b, b)`, :math:`b = g\sqrt{3/\text{fan\_in}}`,
    :math:`g = \sqrt 2` (ReLU) by default.

    ``torch.nn.init.kaiming_uniform_(w, a=0, nonlinearity="relu")`` (torch's ``a`` is
    ``gain=calculate_gain("leaky_relu", a)``), Keras ``HeUniform``.

    References
    ----------
    He et al., "Delving Deep into Rectifiers: Surpassing Human-Level Performance on ImageNet
    Classification", ICCV 2015.
    """
    return variance_scaling_(w, gain=gain, mode=mode, distribution="uniform", rng=rng)


def he_normal_(w, *, gain=math.sqrt(2.0), mode="fan_in", rng=None):
    r"""He/Kaiming normal: :math:`\mathcal N(0, g^2/\text{fan\_in})`, :math:`g = \sqrt 2` by
    default.

    ``torch.nn.init.kaiming_normal_``; Keras ``HeNormal`` uses a truncated normal.

    References
    ----------
    He et al., ICCV 2015.
    """
    return variance_scaling_(w, gain=gain, mode=mode, distribution="normal", rng=rng)


def lecun_uniform_(w, *, gain=1.0, mode="fan_in", rng=None):
    r"""LeCun uniform: :math:`\mathcal U(-b, b)`, :math:`b = \sqrt{3/\text{fan\_in}}`.

    Keras ``LecunUniform``. With SELU, LeCun initialization keeps the network self-normalizing.

    References
    ----------
    LeCun et al., "Efficient BackProp", 1998; Klambauer et al., "Self-Normalizing Neural
    Networks", NeurIPS 2017.
    """
    return variance_scaling_(w, gain=gain, mode=mode, distribution="uniform", rng=rng)


def lecun_normal_(w, *, gain=1.0, mode="fan_in", rng=None):
    r"""LeCun normal: :math:`\mathcal N(0, 1/\text{fan\_in})`, the initializer for SELU.

    Keras ``LecunNormal`` uses a truncated normal of the same variance.

    References
    ----------
    LeCun et al., 1998; Klambauer et al., NeurIPS 2017.
    """
    return variance_scaling_(w, gain=gain, mode=mode, distribution="normal", rng=rng)


# torch.nn.init spellings
xavier_uniform_ = glorot_uniform_
xavier_normal_ = glorot_normal_
kaiming_uniform_ = he_uniform_
kaiming_normal_ = he_normal_
