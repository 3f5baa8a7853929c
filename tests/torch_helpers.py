"""Small torch models and training loops shared by the optcore.torch optimizer tests."""
import copy

import torch

# float32 updates computed in another order than torch's (one fused pass instead of a
# sequence of tensor ops, step scalars in float64) differ by a few ulps per step; over 100
# steps of a small model they stay below 1e-6 relative (measured 1e-7..9e-7), so 1e-5 relative
# to the largest entry of each tensor is tight yet safe.
RTOL = 1e-5


class Net(torch.nn.Module):
    """Two trained layers, a frozen layer in between and a layer the forward never uses."""

    def __init__(self, seed=0, width=16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(6, width)
        self.frozen = torch.nn.Linear(width, width)
        self.l2 = torch.nn.Linear(width, 3)
        self.unused = torch.nn.Linear(4, 4)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.l2(torch.tanh(self.frozen(torch.tanh(self.l1(x)))))


def wide(seed=0):
    """A model with a 512 x 512 layer: large enough for the kernels to use several threads."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
                               torch.nn.Tanh(), torch.nn.Linear(512, 3))


def batches(n=100, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 3, generator=g))
            for _ in range(n)]


def loss_of(model, batch):
    """The MSE, negated for a model with ``sign = -1`` (trained with ``maximize=True``)."""
    x, y = batch
    return getattr(model, "sign", 1) * torch.nn.functional.mse_loss(model(x), y)


def pair(seed=0, **kw):
    """Two identical models."""
    m = Net(seed, **kw)
    return m, copy.deepcopy(m)


def train(model, opt, data, *, hook=None, sched=None, start=0):
    """Train with ``model.zero_grad()`` (set_to_none) each step; ``hook(t, model, opt)`` runs
    after backward, ``sched`` (a scheduler or a callable of the loss) after the step."""
    for t, batch in enumerate(data, start):
        model.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        if hook is not None:
            hook(t, model, opt)
        opt.step()
        if sched is not None:
            sched(loss.item())
    return model


def assert_close(a, b, rtol=RTOL, what="", atol=0.0):
    """``a`` equals ``b`` within ``rtol`` of the largest magnitude of ``b`` (plus ``atol``)."""
    assert a.shape == b.shape, what
    # same memory order (strides of dimensions of size 1 do not matter)
    assert [st for st, n in zip(a.stride(), a.shape) if n > 1] == \
        [st for st, n in zip(b.stride(), b.shape) if n > 1], (what, a.stride(), b.stride())
    scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g} + {atol:g}"


def assert_models_close(ma, mb, rtol=RTOL):
    for (name, a), (_, b) in zip(ma.named_parameters(), mb.named_parameters()):
        assert_close(a.detach(), b.detach(), rtol, name)


def assert_states_close(oa, ob, rtol=RTOL):
    """Same state keys per parameter, tensors close (scalars equal)."""
    pa = [p for g in oa.param_groups for p in g["params"]]
    pb = [p for g in ob.param_groups for p in g["params"]]
    for i, (a, b) in enumerate(zip(pa, pb)):
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        assert sorted(sa) == sorted(sb), (i, sorted(sa), sorted(sb))
        for k in sb:
            if sb[k] is None:
                assert sa[k] is None
            elif sb[k].dim() == 0:
                assert sa[k].dtype == sb[k].dtype, (i, k)
                assert abs(sa[k].item() - sb[k].item()) <= 1e-6 * abs(sb[k].item()), (i, k)
            else:
                assert_close(sa[k], sb[k], rtol, f"param {i} state {k}")


def snapshot(model, opt):
    """Every parameter, gradient and state tensor (cloned) and the state keys."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for i, s in enumerate(opt.state.get(p, None) for p in model.parameters())
             if s is not None}
    return params, grads, state


def bitwise_equal(a, b):
    """Equal bits (NaN included), same shape and dtype."""
    if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout:
        return False
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    if a.is_floating_point():
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    return torch.equal(a, b)


def assert_unchanged(before, model, opt):
    after = snapshot(model, opt)
    for a, b in zip(before[0], after[0]):
        assert bitwise_equal(a, b)
    for a, b in zip(before[1], after[1]):
        assert (a is None) == (b is None) and (a is None or bitwise_equal(a, b))
    assert sorted(before[2]) == sorted(after[2])
    for i in before[2]:
        assert sorted(before[2][i]) == sorted(after[2][i])
        for k, v in before[2][i].items():
            w = after[2][i][k]
            assert bitwise_equal(v, w) if isinstance(v, torch.Tensor) else v == w
