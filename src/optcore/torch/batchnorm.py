"""Batch-norm modules for torch that run optcore's kernels on the tensors' own memory.

:class:`BatchNorm1d` and :class:`BatchNorm2d` are torch's modules (subclasses, same constructor,
parameters, buffers and ``state_dict``) whose forward and backward are optcore's batch-norm
kernels behind a :class:`torch.autograd.Function`. :class:`BatchNormReLU1d` and
:class:`BatchNormReLU2d` fuse the ReLU that follows. :func:`convert_batchnorm` swaps them into a
model and back.

An input reaches the kernels as a zero-copy NumPy view: ``(N, C)`` and ``(N, C, L)`` /
NCHW tensors contiguous in memory, and channels-last tensors (``channels_last`` NCHW, or
``(N, C, L)`` with the channels innermost), which are C-contiguous ``(N, ..., C)`` buffers. The
output has the input's memory format, as torch's. Everything else (another device or dtype,
other strides, an empty batch) goes to ``torch.nn.functional.batch_norm``.
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase

from optcore import _batchnorm_functions as bnf

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNormReLU1d", "BatchNormReLU2d",
           "convert_batchnorm"]


def _channels_last_order(ndim):
    """The permutation that moves dimension 1 (channels) last: (0, 2, ..., ndim - 1, 1)."""
    return (0, *range(2, ndim), 1)


def _plan(x):
    """How the kernels read ``x``: ``(layout, geometry)``, or None when they cannot (the caller
    falls back to torch). ``x`` must be a float32 CPU tensor of at least 2 dimensions."""
    if x.numel() == 0:
        return None
    if x.is_contiguous():
        layout = "NC" if x.dim() == 2 else "NCHW"
    elif x.dim() > 2 and x.permute(_channels_last_order(x.dim())).is_contiguous():
        layout = "NHWC"
    else:
        return None
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // (N * C)
    if layout == "NCHW":
        return layout, (N, C, S, True)
    return layout, (N * S, C, 1, False)


def _view(t, layout):
    """A NumPy view of ``t`` in ``layout`` (NHWC: channels moved last); ``t`` must be dense in
    that order."""
    t = t.detach()
    if layout == "NHWC":
        t = t.permute(_channels_last_order(t.dim()))
    return t.numpy()


def _in_layout(t, layout):
    """``t`` (an incoming gradient) as a NumPy view in ``layout``, converted once when its
    memory format differs from the input's (torch's own kernels do the same)."""
    if layout == "NHWC":
        p = t.permute(_channels_last_order(t.dim()))
        return (p if p.is_contiguous() else p.contiguous()).detach().numpy()
    return (t if t.is_contiguous() else t.contiguous()).detach().numpy()


def _empty_like(x, layout):
    """An uninitialized tensor shaped like ``x`` in ``layout``'s memory format (not a view, so
    in-place operations on the output, e.g. ``nn.ReLU(inplace=True)``, stay allowed)."""
    if layout != "NHWC":
        return torch.empty(x.shape, dtype=x.dtype)
    strides = [0] * x.dim()
    step = 1
    for d in reversed(_channels_last_order(x.dim())):
        strides[d] = step
        step *= x.shape[d]
    return torch.empty_strided(x.shape, strides, dtype=x.dtype)


def _vec(t):
    return None if t is None else t.detach().numpy()


class _BatchNormFunction(torch.autograd.Function):
    """y = BN(x) (or ReLU(BN(x))) on optcore's kernels; backward by optcore's kernels too."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, batch_stats, momentum, eps,
                relu, plan):
        layout, geometry = plan
        y = _empty_like(x, layout)
        xa, ya = _view(x, layout), _view(y, layout)
        gamma, beta = _vec(weight), _vec(bias)
        if batch_stats:
            mean, var, invstd = bnf.forward_unchecked(xa, gamma, beta, geometry, eps, ya, relu)
            if running_mean is not None:
                bnf.update_running(running_mean.numpy(), running_var.numpy(), mean, var,
                                   geometry[0] * geometry[2], momentum)
            ctx.stats = (mean, invstd)
        else:
            rm, rv = running_mean.numpy().copy(), running_var.numpy().copy()
            bnf.inference_unchecked(xa, gamma, beta, rm, rv, geometry, eps, ya, relu)
            ctx.stats = (rm, rv)
        ctx.batch_stats, ctx.eps, ctx.plan = batch_stats, eps, plan
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        layout, geometry = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = _empty_like(x, layout) if need_x else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(weight) if need_b else None
        args = (_in_layout(dy, layout), _view(x, layout), _vec(weight), *ctx.stats, geometry)
        outs = (None if dx is None else _view(dx, layout), _vec(dw), _vec(db),
                None if y is None else _view(y, layout))
        if ctx.batch_stats:
            bnf.backward_unchecked(*args, *outs)
        else:
            bnf.inference_backward_unchecked(*args, ctx.eps, *outs)
        return dx, dw, db, None, None, None, None, None, None, None


def _kernel_plan(x, tensors, batch_stats):
    """The plan of ``x`` when optcore's kernels apply to this call (``tensors``: the module's
    weight, bias and running statistics, each may be None), else None."""
    f32 = torch.float32
    if x.dtype != f32 or x.device.type != "cpu" or x.layout != torch.strided:
        return None
    C = x.shape[1]
    for t in tensors:
        if t is not None and (t.dtype != f32 or t.device.type != "cpu" or t.dim() != 1
                              or t.shape[0] != C or t.stride(0) != 1):
            return None
    plan = _plan(x)
    if plan is None or (batch_stats and plan[1][0] * plan[1][2] < 2):
        return None  # torch raises its error for a single value per channel
    return plan


def _batch_norm(module, x, relu):
    """torch's ``_BatchNorm.forward`` on optcore's kernels where they apply. The batch counter
    moves only after a successful call, so a rejected input changes no buffer."""
    module._check_input_dim(x)
    training = module.training
    params, buffers = module._parameters, module._buffers  # one lookup each, not __getattr__
    weight, bias = params["weight"], params["bias"]
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    count = None
    if training and module.track_running_stats:
        count = buffers["num_batches_tracked"]
    if module.momentum is None:
        momentum = 1.0 / (float(count) + 1.0) if count is not None else 0.0
    else:
        momentum = module.momentum
    batch_stats = training or (running_mean is None and running_var is None)
    use_running = not training or module.track_running_stats
    rm = running_mean if use_running else None
    rv = running_var if use_running else None
    plan = _kernel_plan(x, (weight, bias, rm, rv), batch_stats)
    if plan is None:
        y = F.batch_norm(x, rm, rv, weight, bias, batch_stats, momentum, module.eps)
        if relu:
            y = F.relu(y)
    else:
        y = _BatchNormFunction.apply(x, weight, bias, rm, rv, batch_stats, momentum, module.eps,
                                     relu, plan)
    if count is not None:
        count.add_(1)
    return y


class BatchNorm1d(nn.BatchNorm1d):
    r"""``torch.nn.BatchNorm1d`` on optcore's kernels: a drop-in replacement.

    Same constructor (``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True``, ``momentum=None`` for the cumulative average), same parameters
    and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) and ``state_dict``; train and eval behave as torch's:

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with the batch statistics in training (the running ones updated with the unbiased
    variance) and the running ones in eval. See :func:`optcore.kernels.batchnorm_forward`.

    Forward and backward run optcore's kernels through a :class:`torch.autograd.Function` on
    the input's own memory (no copy) for float32 CPU tensors of shape ``(N, C)`` (contiguous)
    or ``(N, C, L)`` (contiguous, or channels innermost); the output keeps the input's memory
    format. Any other input (another device or dtype, other strides) falls back to
    ``torch.nn.functional.batch_norm``, which also raises torch's errors for bad input (wrong
    channel count, one value per channel in training); a rejected input changes no buffer.
    A gradient arriving in another memory format than the input's is converted once.
    Double backward is not supported: it raises a ``RuntimeError`` (the backward is
    ``once_differentiable``).

    Examples
    --------
    >>> import torch, optcore.torch
    >>> bn = optcore.torch.BatchNorm1d(4)
    >>> y = bn(torch.randn(8, 4, requires_grad=True))
    >>> y.sum().backward()
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']

    References
    ----------
    Ioffe, Szegedy, ICML 2015; ``torch.nn.BatchNorm1d``.
    """

    def forward(self, input):
        """Normalize ``input`` (see the class docstring)."""
        return _batch_norm(self, input, False)


class BatchNorm2d(nn.BatchNorm2d):
    r"""``torch.nn.BatchNorm2d`` on optcore's kernels: a drop-in replacement.

    As :class:`BatchNorm1d`, for ``(N, C, H, W)`` inputs: contiguous (NCHW) and
    ``torch.channels_last`` tensors are read in place, and the output keeps the input's memory
    format. Other inputs fall back to ``torch.nn.functional.batch_norm``.

    Examples
    --------
    >>> import torch, optcore.torch
    >>> bn = optcore.torch.BatchNorm2d(3)
    >>> x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    >>> bn(x).is_contiguous(memory_format=torch.channels_last)
    True
    """

    def forward(self, input):
        """Normalize ``input`` (see the class docstring)."""
        return _batch_norm(self, input, False)


class BatchNormReLU1d(_NormBase):
    r"""Batch norm followed by ReLU, fused: ``max(BatchNorm1d(x), 0)`` in one module.

    Constructor, parameters, buffers and ``state_dict`` are those of :class:`BatchNorm1d`, so a
    checkpoint of a ``BatchNorm1d`` loads into it. The forward sweep writes the clamped output
    and the backward masks the gradient by ``y > 0`` inside batch norm's own two sweeps: one
    sweep less each way than the pair. It is deliberately not a ``torch.nn.BatchNorm1d``
    subclass, so that tools which fold or convert batch norms (``fuse_conv_bn_eval``,
    ``SyncBatchNorm.convert_sync_batchnorm``) do not drop the ReLU silently. The fallback for
    inputs the kernels do not take is ``relu(batch_norm(x))`` in torch.

    Examples
    --------
    >>> import torch, optcore.torch
    >>> m = optcore.torch.BatchNormReLU1d(4)
    >>> bool((m(torch.randn(8, 4)) >= 0).all())
    True
    """

    _check_input_dim = nn.BatchNorm1d._check_input_dim

    def forward(self, input):
        """``max(BatchNorm1d(input), 0)`` (see the class docstring)."""
        return _batch_norm(self, input, True)


class BatchNormReLU2d(_NormBase):
    r"""Batch norm followed by ReLU, fused, for ``(N, C, H, W)`` inputs (NCHW or channels_last):
    ``max(BatchNorm2d(x), 0)``. See :class:`BatchNormReLU1d`.

    Examples
    --------
    >>> import torch, optcore.torch
    >>> m = optcore.torch.BatchNormReLU2d(3)
    >>> bool((m(torch.randn(2, 3, 4, 4)) >= 0).all())
    True
    """

    _check_input_dim = nn.BatchNorm2d._check_input_dim

    def forward(self, input):
        """``max(BatchNorm2d(input), 0)`` (see the class docstring)."""
        return _batch_norm(self, input, True)


class _FusedReLU(nn.Identity):
    """Stands where a ReLU was fused into the preceding batch norm (so the conversion back
    knows to restore it)."""


_TO_OPTCORE = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}
_FUSED = {nn.BatchNorm1d: BatchNormReLU1d, nn.BatchNorm2d: BatchNormReLU2d}
_TO_TORCH = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d,
             BatchNormReLU1d: nn.BatchNorm1d, BatchNormReLU2d: nn.BatchNorm2d}


def _swap(module, cls):
    """A ``cls`` module sharing ``module``'s parameters and buffers, in its training mode."""
    new = cls(module.num_features, module.eps, module.momentum, module.affine,
              module.track_running_stats, bias=module.bias is not None)
    with torch.no_grad():
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def _convert_children(module, direction, fuse_relu):
    """Convert ``module``'s children in place; inside an ``nn.Sequential``, fuse (or split)
    batch norm + ReLU pairs."""
    children = list(module.named_children())
    pair = isinstance(module, nn.Sequential)
    skip = False
    for i, (name, child) in enumerate(children):
        if skip:
            skip = False
            continue
        nxt = children[i + 1] if pair and i + 1 < len(children) else (None, None)
        if direction == "optcore" and fuse_relu and type(child) in _FUSED and type(nxt[1]) is nn.ReLU:
            module.add_module(name, _swap(child, _FUSED[type(child)]))
            module.add_module(nxt[0], _FusedReLU())
            skip = True
        elif direction == "torch" and type(child) in _FUSED.values() and type(nxt[1]) is _FusedReLU:
            module.add_module(name, _swap(child, _TO_TORCH[type(child)]))
            module.add_module(nxt[0], nn.ReLU())
            skip = True
        elif type(child) is not _FusedReLU:
            module.add_module(name, convert_batchnorm(child, direction, fuse_relu=fuse_relu))


def convert_batchnorm(module, direction="optcore", *, fuse_relu=False):
    """Swap the batch norms of a model between torch's modules and optcore's.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every ``torch.nn.BatchNorm1d`` /
    ``BatchNorm2d`` (exactly those classes) becomes :class:`BatchNorm1d` /
    :class:`BatchNorm2d` (``direction="optcore"``), or back (``direction="torch"``). The new
    modules share the old ones' parameters and buffers (an optimizer built on the model still
    holds the right tensors), keep the training mode, and the ``state_dict`` is unchanged.

    Parameters
    ----------
    module : torch.nn.Module
        The model, converted in place; if it is itself a batch norm, a new module is returned.
    direction : {"optcore", "torch"}
    fuse_relu : bool, default False
        With ``direction="optcore"``: inside an ``nn.Sequential``, a batch norm directly
        followed by ``nn.ReLU`` becomes :class:`BatchNormReLU1d`/``2d`` and the ReLU an
        identity (no parameters, so the ``state_dict`` keys stay). ``direction="torch"``
        restores both.

    Returns
    -------
    torch.nn.Module
        ``module`` (or the new batch norm).

    Raises
    ------
    ValueError
        An unknown ``direction``, or (``direction="torch"``) a :class:`BatchNormReLU2d` (or
        1d) that is not followed by the identity a fusion left, which has no torch equivalent
        in one module.

    Examples
    --------
    >>> import torch, optcore.torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    >>> net = optcore.torch.convert_batchnorm(net, fuse_relu=True)
    >>> [type(m).__name__ for m in net]
    ['Linear', 'BatchNormReLU1d', '_FusedReLU']
    >>> [type(m).__name__ for m in optcore.torch.convert_batchnorm(net, "torch")]
    ['Linear', 'BatchNorm1d', 'ReLU']
    """
    if direction not in ("optcore", "torch"):
        raise ValueError(f"direction must be 'optcore' or 'torch', got {direction!r}")
    cls = type(module)
    if direction == "optcore" and cls in _TO_OPTCORE:
        return _swap(module, _TO_OPTCORE[cls])
    if direction == "torch" and cls in _TO_TORCH:
        if cls in _FUSED.values():
            raise ValueError(
                f"{cls.__name__} outside a fused pair of an nn.Sequential has no single torch "
                "module; replace it with nn.Sequential(nn.BatchNorm..., nn.ReLU()) yourself"
            )
        return _swap(module, _TO_TORCH[cls])
    _convert_children(module, direction, fuse_relu)
    return module
