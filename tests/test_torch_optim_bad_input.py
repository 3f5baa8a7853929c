"""optcore.torch optimizers refuse what they cannot update in place, naming the group and the
parameter index, before anything of the step is written."""
import math

import pytest

torch = pytest.importorskip("torch")

import optcore  # noqa: E402
import optcore.torch as ot  # noqa: E402
from torch_helpers import Net, assert_unchanged, batches, loss_of, snapshot, train  # noqa: E402

NAMES = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam"]


def two_groups(m, name, **kw):
    kw = dict(kw, momentum=0.9) if name in ("SGD", "RMSprop") else kw
    return getattr(ot, name)([{"params": m.l1.parameters()}, {"params": m.l2.parameters()}], **kw)


def backward(m):
    m.zero_grad()
    loss_of(m, batches(1, seed=9)[0]).backward()


@pytest.mark.parametrize("trained", [False, True], ids=["first-step", "mid-training"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, error, match", [
    ("strides", ValueError, "strides"),
    ("sparse", TypeError, "sparse"),
    ("dtype", TypeError, "dtype"),
    ("lr", ValueError, "lr"),
    ("nan-lr", ValueError, "lr"),
    ("betas", (TypeError, ValueError), "betas|momentum|alpha|lr_decay|eps"),
    ("capturable", ValueError, "capturable"),
])
def test_bad_step_changes_nothing(name, bad, error, match, trained):
    """Group 0 is fine, group 1 is bad: nothing of group 0 is written either, and no state
    is created."""
    m = Net()
    opt = two_groups(m, name)
    if trained:
        train(m, opt, batches(3))
    backward(m)
    group, p = opt.param_groups[1], m.l2.weight
    where = r"param_groups\[1\]"
    if bad == "strides":
        p.grad = p.grad.t().contiguous().t()  # same values, column-major
        where += " param 0"
    elif bad == "sparse":
        p.grad = None
        p.grad = torch.zeros_like(p).to_sparse()
        where += " param 0"
    elif bad == "dtype":
        p.data = p.data.double()  # as model.double() after the optimizer was made
        where += " param 0"
    elif bad == "lr":
        group["lr"] = -1.0
    elif bad == "nan-lr":
        group["lr"] = math.nan
    elif bad == "betas":
        key = {"SGD": "momentum", "RMSprop": "alpha", "Adagrad": "lr_decay"}.get(name, "betas")
        group[key] = (0.9, 1.5) if key == "betas" else -0.5
    elif bad == "capturable":
        group["capturable"] = True
    before = snapshot(m, opt)
    with pytest.raises(error, match=match) as info:
        opt.step()
    assert __import__("re").search(where, str(info.value)), str(info.value)
    assert_unchanged(before, m, opt)


@pytest.mark.parametrize("name", NAMES)
def test_bad_construction(name):
    cls = getattr(ot, name)
    with pytest.raises(TypeError, match=r"param_groups\[0\] param 1.*dtype"):
        cls([torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(TypeError, match=r"param_groups\[0\] param 0"):
        cls([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match=r"param_groups\[0\] param 0.*not dense"):
        cls([torch.zeros(4, 6)[:, ::2].requires_grad_()])
    base = torch.zeros(20)
    shared = [torch.nn.Parameter(base[:10]), torch.nn.Parameter(base[5:15])]
    with pytest.raises(ValueError, match=r"param_groups\[0\] param 0 and param_groups\[0\] param 1 share memory"):
        cls(shared)
    opt = cls([torch.nn.Parameter(base[:5])])
    with pytest.raises(ValueError, match=r"param_groups\[1\] param 0 .*share memory"):
        opt.add_param_group({"params": [torch.nn.Parameter(base[2:4])]})
    assert len(opt.param_groups) == 1 and len(opt._plans) == 1
    with pytest.raises(ValueError, match="differentiable"):
        cls([torch.zeros(3, requires_grad=True)], differentiable=True)
    if "capturable" in cls.__init__.__code__.co_varnames:
        with pytest.raises(ValueError, match="capturable"):
            cls([torch.zeros(3, requires_grad=True)], capturable=True)
    with pytest.raises(ValueError, match="lr"):
        cls([torch.zeros(3, requires_grad=True)], lr=-1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        cls([torch.zeros(3, requires_grad=True)], nonfinite="ignore")
    with pytest.raises(TypeError, match="clip"):
        cls([torch.zeros(3, requires_grad=True)], clip=1.0)
    with pytest.raises(TypeError):
        cls(torch.zeros(3, requires_grad=True))  # torch: params must be an iterable
    # fused / foreach are accepted: optcore is always one fused call
    kw = {"foreach": True}
    if "fused" in cls.__init__.__code__.co_varnames:
        kw = {"fused": True}
    cls([torch.zeros(3, requires_grad=True)], **kw)


def test_grad_layout_check_ignores_unit_dimensions():
    """A gradient whose strides differ only on dimensions of size 1 walks the same memory
    order as its parameter: accepted."""
    p = torch.zeros(4, 1, 3, requires_grad=True)
    opt = ot.SGD([p], lr=1.0)
    p.grad = torch.ones(4, 3).unsqueeze(1).as_strided((4, 1, 3), (3, 7, 1))
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(4, 1, 3))


def test_grad_aliasing_a_parameter_is_refused():
    a = torch.zeros(6, requires_grad=True)
    b = torch.zeros(6, requires_grad=True)
    opt = ot.Adam([a, b])
    a.grad = b.detach()
    b.grad = torch.ones(6)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(6)) and not opt.state


def test_adaptive_clip_needs_rows_in_blocks():
    w = torch.zeros(3, 4).t().requires_grad_()  # dim 0 is not the outermost
    opt = ot.Adam([w], clip=optcore.clip.Adaptive())
    w.grad = torch.ones(3, 4).t()
    with pytest.raises(ValueError, match=r"param_groups\[0\] param 0.*dim 0"):
        opt.step()
    assert not opt.state
