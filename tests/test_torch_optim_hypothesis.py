"""optcore.torch optimizers against torch.optim over random shapes, memory formats,
hyper-parameters and gradient patterns (hypothesis)."""
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import optcore.torch as ot  # noqa: E402
from torch_helpers import assert_close  # noqa: E402

SHAPES = st.lists(
    st.one_of(
        st.tuples(),
        st.tuples(st.integers(0, 40)),
        st.tuples(st.integers(1, 9), st.integers(1, 9)),
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
    ),
    min_size=1, max_size=5,
)

UNIT = st.floats(0.0, 0.99)
HYPER = {
    "SGD": st.fixed_dictionaries({"lr": st.floats(1e-3, 0.1), "momentum": UNIT,
                                  "dampening": st.floats(0.0, 0.5), "weight_decay": st.floats(0, 0.1),
                                  "maximize": st.booleans()}),
    "Adagrad": st.fixed_dictionaries({"lr": st.floats(1e-3, 0.1), "lr_decay": st.floats(0, 0.1),
                                      "weight_decay": st.floats(0, 0.1), "eps": st.floats(1e-10, 1e-3),
                                      "initial_accumulator_value": st.floats(0, 1)}),
    "RMSprop": st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-2), "alpha": st.floats(0.5, 0.999),
                                      "momentum": UNIT, "centered": st.booleans(),
                                      "weight_decay": st.floats(0, 0.1), "eps": st.floats(1e-3, 1e-1)}),
    "Adam": st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-2), "betas": st.tuples(UNIT, st.floats(0.5, 0.999)),
                                   "weight_decay": st.floats(0, 0.1), "amsgrad": st.booleans(),
                                   "decoupled_weight_decay": st.booleans(), "maximize": st.booleans()}),
    "AdamW": st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-2), "weight_decay": st.floats(0, 0.1),
                                    "amsgrad": st.booleans()}),
    "Adamax": st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-2), "betas": st.tuples(UNIT, st.floats(0.5, 0.999)),
                                     "weight_decay": st.floats(0, 0.1)}),
    "NAdam": st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-2), "betas": st.tuples(UNIT, st.floats(0.5, 0.999)),
                                    "momentum_decay": st.floats(0, 0.01), "weight_decay": st.floats(0, 0.1),
                                    "decoupled_weight_decay": st.booleans()}),
}


@st.composite
def problems(draw):
    name = draw(st.sampled_from(sorted(HYPER)))
    hyper = draw(HYPER[name])
    if name == "SGD" and draw(st.booleans()) and hyper["momentum"] > 0:
        hyper.update(nesterov=True, dampening=0.0)
    shapes = draw(SHAPES)
    channels_last = [len(s) == 4 and draw(st.booleans()) for s in shapes]
    steps = draw(st.integers(1, 6))
    # which parameters have no gradient at each step (torch skips them and counts nothing)
    missing = draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                            min_size=steps, max_size=steps))
    seed = draw(st.integers(0, 2**16))
    return name, hyper, shapes, channels_last, missing, seed


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_problems_match_torch(problem):
    name, hyper, shapes, channels_last, missing, seed = problem
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in missing]

    def params():
        out = []
        for t, cl in zip(init, channels_last):
            p = t.clone().to(memory_format=torch.channels_last) if cl else t.clone()
            out.append(p.requires_grad_())
        return out

    pa, pb = params(), params()
    oa = getattr(ot, name)(pa, **hyper)
    ob = getattr(torch.optim, name)(pb, foreach=False, **hyper)
    for gs, miss in zip(grads, missing):
        for ps, o in ((pa, oa), (pb, ob)):
            for p, gr, m, cl in zip(ps, gs, miss, channels_last):
                fmt = torch.channels_last if cl else torch.contiguous_format
                p.grad = None if m else gr.clone().to(memory_format=fmt)
            o.step()
    # Gradients and parameters are O(1): a state entry that nearly cancels (m and g of
    # opposite signs) keeps an absolute float32 rounding error of up to ~ulp(1) = 1.2e-7 that
    # its own small magnitude does not bound; hence atol=2e-7 beside the relative 1e-5.
    for a, b in zip(pa, pb):
        assert_close(a.detach(), b.detach(), what=f"{name} {hyper}", atol=2e-7)
    for a, b in zip(pa, pb):
        sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
        assert sorted(sa) == sorted(sb)
        for k in sb:
            if k in ("step", "mu_product"):
                assert sa[k].item() == pytest.approx(sb[k].item(), rel=1e-6)
            else:
                assert_close(sa[k], sb[k], what=f"state {k}", atol=2e-7)
