"""BatchNorm: a batch-normalization layer over optcore's kernels, with running statistics and
folding into the previous layer."""
import numpy as np

from optcore import _checks as ck
from optcore import kernels as K
from optcore._batchnorm_functions import BN_LAYOUTS
from optcore.params import Parameters, aligned_zeros

__all__ = ["BatchNorm"]

_FOLD_LAYOUTS = ("dense", "linear", "conv")


class BatchNorm:
    r"""Batch normalization (Ioffe & Szegedy 2015) of an ``(N, C)``, NCHW or NHWC tensor.

    Training (:meth:`forward` with ``training=True``) normalizes with the batch statistics and
    updates the running ones as torch does; inference uses the running statistics (one fused
    ``y = x * a + b`` sweep). See :func:`optcore.kernels.batchnorm_forward` for the formulas.

    .. math::
        \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B,\qquad
        \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\frac{n}{n - 1}\,\sigma_B^2

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variance, > 0.
    momentum : float in [0, 1] or None, default 0.1
        Weight :math:`m` of the batch statistic in the running update (torch's convention;
        Keras's ``momentum`` is ``1 - m``). None gives the cumulative average over all batches
        seen (:math:`m = 1 / t` at the :math:`t`-th training batch), as torch.
    affine : bool, default True
        Learn a per-channel scale ``weight`` (:math:`\gamma`, initialised to 1) and shift
        ``bias`` (:math:`\beta`, initialised to 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (initialised to 0) and ``running_var`` (to 1) for inference.
        Without them, inference normalizes with the batch statistics, as torch does.
    layout : {"NC", "NCHW", "NHWC"}, default "NC"
        Layout of the inputs (see :func:`optcore.kernels.batchnorm_forward`).
    params : Parameters, optional
        An arena holding ``weight`` and ``bias`` as ``params[prefix + ".weight"]`` and
        ``params[prefix + ".bias"]``, each of shape ``(num_features,)``, so that an optimizer
        over the arena updates them with the other parameters; :meth:`backward` then writes
        their gradients into ``params.grads``. Declare them when building the arena, e.g.
        ``Parameters({"w1": (784, 64), **BatchNorm.param_shapes(64, prefix="bn1")})``.
        Without an arena the layer owns its arrays (``weight``, ``bias``, ``weight_grad``,
        ``bias_grad``). The constructor initialises the values (1 and 0): load checkpoints
        after building the layers.
    prefix : str, default "bn"
        Name prefix in ``params``.

    Attributes
    ----------
    weight, bias : ndarray or None
        :math:`\gamma` and :math:`\beta` (views into ``params`` when given).
    weight_grad, bias_grad : ndarray or None
        Their gradients, overwritten by each :meth:`backward` (not accumulated).
    running_mean, running_var : ndarray or None
    num_batches_tracked : int

    Examples
    --------
    >>> import numpy as np, optcore
    >>> params = optcore.Parameters({"w": (3, 4), **optcore.BatchNorm.param_shapes(4, "bn1")})
    >>> bn = optcore.BatchNorm(4, params=params, prefix="bn1")
    >>> x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    >>> y = bn.forward(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> params.grads["bn1.bias"]
    array([8., 8., 8., 8.], dtype=float32)

    References
    ----------
    Ioffe, Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015; ``torch.nn.BatchNorm1d``/``BatchNorm2d``.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NC", params=None, prefix="bn"):
        self.num_features = C = ck.positive_int("num_features", num_features)
        self.eps = ck.in_range("eps", eps, 0.0, np.inf, lo_open=True, hi_open=True)
        self.momentum = None if momentum is None else ck.in_range("momentum", momentum, 0.0, 1.0)
        self.affine = ck.boolean("affine", affine)
        self.track_running_stats = ck.boolean("track_running_stats", track_running_stats)
        if not isinstance(layout, str) or layout not in BN_LAYOUTS:
            raise ValueError(f"layout must be one of {BN_LAYOUTS}, got {layout!r}")
        self.layout = layout
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.weight = self.bias = self.weight_grad = self.bias_grad = None
        if params is not None:
            if not isinstance(params, Parameters):
                raise TypeError(f"params must be an optcore.Parameters, got {type(params).__name__}")
            if not affine:
                raise ValueError("params holds the scale and shift; it needs affine=True")
            views = {}
            for name in self.param_shapes(C, prefix):
                if name not in params.layout.names:
                    raise ValueError(
                        f"params has no {name!r}; declare it with shape ({C},), e.g. "
                        f"Parameters({{..., **BatchNorm.param_shapes({C}, {prefix!r})}})"
                    )
                if params.layout.shapes[name] != (C,):
                    raise ValueError(f"params[{name!r}] has shape {params.layout.shapes[name]}, "
                                     f"expected ({C},)")
                views[name] = (params[name], params.grads[name])
            (self.weight, self.weight_grad), (self.bias, self.bias_grad) = views.values()
        elif affine:
            self.weight, self.bias = aligned_zeros(C), aligned_zeros(C)
            self.weight_grad, self.bias_grad = aligned_zeros(C), aligned_zeros(C)
        self.running_mean = self.running_var = None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype=np.float32)
            self.running_var = np.ones(C, dtype=np.float32)
        self.num_batches_tracked = 0
        self._saved = None
        self.reset_parameters()

    @staticmethod
    def param_shapes(num_features, prefix="bn"):
        """Names and shapes to declare in a :class:`~optcore.Parameters` arena.

        Returns ``{prefix + ".weight": (C,), prefix + ".bias": (C,)}``.
        """
        C = ck.positive_int("num_features", num_features)
        return {f"{prefix}.weight": (C,), f"{prefix}.bias": (C,)}

    def reset_parameters(self):
        """Set weight to 1, bias to 0, the running statistics to 0 and 1 and the count to 0."""
        if self.affine:
            self.weight[...] = 1.0
            self.bias[...] = 0.0
        self.reset_running_stats()

    def reset_running_stats(self):
        """Set ``running_mean`` to 0, ``running_var`` to 1, ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean[...] = 0.0
            self.running_var[...] = 1.0
        self.num_batches_tracked = 0

    def forward(self, x, training=True, *, out=None):
        """Normalize ``x`` (float32, C-contiguous, in ``self.layout``); return ``y``.

        With ``training=True`` the batch statistics normalize and the running statistics are
        updated; otherwise the running ones are used (the batch ones when the layer does not
        track running statistics). ``x`` is kept (not copied) for :meth:`backward`: do not
        modify it in between. ``out`` optionally receives ``y``.
        """
        training = ck.boolean("training", training)
        if training or not self.track_running_stats:
            running = self.track_running_stats and training
            if running:
                t = self.num_batches_tracked + 1
                m = 1.0 / t if self.momentum is None else self.momentum
                y, mean, invstd = K.batchnorm_forward(
                    x, self.weight, self.bias, eps=self.eps, layout=self.layout, out=out,
                    running_mean=self.running_mean, running_var=self.running_var, momentum=m)
                self.num_batches_tracked = t
            else:
                y, mean, invstd = K.batchnorm_forward(x, self.weight, self.bias, eps=self.eps,
                                                      layout=self.layout, out=out)
            self._saved = (True, x, mean, invstd)
        else:
            y = K.batchnorm_inference(x, self.weight, self.bias, self.running_mean,
                                      self.running_var, eps=self.eps, layout=self.layout, out=out)
            self._saved = (False, x, None, None)
        return y

    __call__ = forward

    def backward(self, dy, *, dx=None):
        """Gradient with respect to the input of the last :meth:`forward`; return ``dx``.

        Writes the gradients of ``weight`` and ``bias`` into ``weight_grad`` and ``bias_grad``
        (``params.grads`` views when the layer lives in an arena), overwriting them.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        batch_stats, x, mean, invstd = self._saved
        if batch_stats:
            dx, _, _ = K.batchnorm_backward(dy, x, self.weight, mean, invstd, layout=self.layout,
                                            dx=dx, dgamma=self.weight_grad, dbeta=self.bias_grad)
        else:
            dx, _, _ = K.batchnorm_inference_backward(
                dy, x, self.weight, self.running_mean, self.running_var, eps=self.eps,
                layout=self.layout, dx=dx, dgamma=self.weight_grad, dbeta=self.bias_grad)
        return dx

    def state_dict(self):
        """Return the weights and running statistics as plain arrays (``np.savez``-able).

        Keys as torch's: ``weight``, ``bias`` (when affine), ``running_mean``,
        ``running_var``, ``num_batches_tracked`` (when tracking).
        """
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state):
        """Load a state saved by :meth:`state_dict`; everything is checked before anything is
        written."""
        keys = (["weight", "bias"] if self.affine else []) + (
            ["running_mean", "running_var"] if self.track_running_stats else [])
        values = {}
        for k in keys:
            if k not in state:
                raise ValueError(f"state has no {k!r}")
            v = np.asarray(state[k])
            if not np.issubdtype(v.dtype, np.floating):
                raise TypeError(f"state[{k!r}] must be floating point, got {v.dtype}")
            if v.shape != (self.num_features,):
                raise ValueError(f"state[{k!r}] has shape {v.shape}, expected ({self.num_features},)")
            values[k] = v
        count = 0
        if self.track_running_stats:
            if "num_batches_tracked" not in state:
                raise ValueError("state has no 'num_batches_tracked'")
            c = np.asarray(state["num_batches_tracked"])
            if c.shape != () or not np.issubdtype(c.dtype, np.integer) or c < 0:
                raise ValueError(f"state['num_batches_tracked'] must be an int >= 0, got {c!r}")
            count = int(c)
        for k, v in values.items():
            getattr(self, k)[...] = v
        self.num_batches_tracked = count

    def fold_into(self, weight, bias=None, *, layout=None):
        r"""Fold the inference-mode normalization into the preceding linear layer.

        With :math:`a = \gamma / \sqrt{\hat\sigma^2 + \epsilon}` per output channel:

        .. math::
            W'_{\cdot c} = a_c\, W_{\cdot c},\qquad b'_c = a_c\,(b_c - \hat\mu_c) + \beta_c

        so that the folded layer computes what the layer followed by this normalization
        computes in inference mode (as torch's ``fuse_linear_bn_eval`` and
        ``fuse_conv_bn_eval``), without the normalization's cost.

        Parameters
        ----------
        weight : ndarray (float32 or float64)
            The preceding layer's weight; not modified.
        bias : ndarray of shape (C,), optional
            Its bias; None for a layer without bias (taken as 0).
        layout : {"dense", "linear", "conv"}, optional
            Where the C output channels are in ``weight``: ``"dense"`` on the last axis,
            i.e. optcore's and Keras's dense ``(in, out)`` with ``y = x @ W + b`` (and Keras's
            ``(kh, kw, in, out)`` convolution kernels); ``"linear"`` and ``"conv"`` on the
            first axis, torch's ``nn.Linear`` ``(out, in)`` with ``y = x @ W.T + b`` and
            convolution ``(out, in, kh, kw)``. By default ``"dense"`` for a 2-D weight, else
            ``"conv"``.

        Returns
        -------
        weight, bias : ndarray
            New arrays of ``weight``'s dtype, computed in float64.
        """
        if not self.track_running_stats:
            raise ValueError("fold_into needs running statistics (track_running_stats=True)")
        if not isinstance(weight, np.ndarray) or weight.dtype not in (np.float32, np.float64):
            raise TypeError("weight must be a float32 or float64 ndarray")
        if layout is None:
            layout = "dense" if weight.ndim == 2 else "conv"
        if layout not in _FOLD_LAYOUTS:
            raise ValueError(f"layout must be one of {_FOLD_LAYOUTS}, got {layout!r}")
        if weight.ndim < 2 or (layout != "conv" and weight.ndim != 2):
            raise ValueError(f"a {layout!r} weight must be {'2-D' if layout != 'conv' else 'at least 3-D'}"
                             f", got shape {weight.shape}")
        C = self.num_features
        axis = weight.ndim - 1 if layout == "dense" else 0
        if weight.shape[axis] != C:
            raise ValueError(f"weight has {weight.shape[axis]} output channels on axis {axis} "
                             f"(layout {layout!r}, shape {weight.shape}); the normalization has {C}")
        if bias is not None:
            if not isinstance(bias, np.ndarray) or not np.issubdtype(bias.dtype, np.floating):
                raise TypeError("bias must be a floating-point ndarray or None")
            if bias.shape != (C,):
                raise ValueError(f"bias must have shape ({C},), got {bias.shape}")
        a = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        shift = np.zeros(C) if not self.affine else self.bias.astype(np.float64)
        if self.affine:
            a = a * self.weight
        b = np.zeros(C) if bias is None else bias.astype(np.float64)
        shape = [1] * weight.ndim
        shape[axis] = C
        new_w = (weight.astype(np.float64) * a.reshape(shape)).astype(weight.dtype)
        new_b = (a * (b - self.running_mean) + shift).astype(weight.dtype)
        return new_w, new_b

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"layout={self.layout!r})")
