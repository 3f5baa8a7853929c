"""optcore.torch._tensors: which torch tensors the kernels may address, and their addresses."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optcore.torch import _tensors as tt  # noqa: E402


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(3, 4),
    lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last),
    lambda: torch.zeros(4, 3).t(),
    lambda: torch.zeros(5, 1, 3)[:, :, :],
    lambda: torch.zeros(()),
    lambda: torch.zeros(0, 3),
    lambda: torch.zeros(6, 7)[2],
])
def test_dense_tensors_are_accepted(make):
    t = make()
    assert tt.check_tensor("p", t) is t


@pytest.mark.parametrize("make, error, match", [
    (lambda: torch.zeros(4, 6)[:, ::2], ValueError, "not dense"),
    (lambda: torch.zeros(4, 6)[:, :3], ValueError, "not dense"),
    (lambda: torch.zeros(3).expand(4, 3), ValueError, "not dense"),
    (lambda: torch.zeros(3, dtype=torch.float64), TypeError, "dtype"),
    (lambda: torch.zeros(3, dtype=torch.complex64), TypeError, "dtype"),
    (lambda: torch.zeros(3, 3).to_sparse(), TypeError, "sparse"),
    (lambda: np.zeros(3, np.float32), TypeError, "torch.Tensor"),
])
def test_bad_tensors_are_named(make, error, match):
    with pytest.raises(error, match=match) as info:
        tt.check_tensor("group 0 param 1", make())
    assert "group 0 param 1" in str(info.value)


def test_same_layout_ignores_strides_of_unit_dimensions():
    p = torch.zeros(4, 1, 3)
    g = torch.zeros(4, 3).unsqueeze(1).as_strided((4, 1, 3), (3, 7, 1))
    tt.same_layout("grad", g, "param", p)
    cl = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="memory format"):
        tt.same_layout("grad", torch.zeros(2, 3, 4, 5), "param", cl)
    with pytest.raises(ValueError, match="shape"):
        tt.same_layout("grad", torch.zeros(3), "param", torch.zeros(4))


def test_addresses_and_lengths():
    base = torch.zeros(10)
    ts = [base[2:5], torch.zeros(3, 2)]
    np.testing.assert_array_equal(tt.lengths(ts), [3, 6])
    assert tt.addresses(ts)[0] == base.data_ptr() + 8


def test_no_overlap_names_the_pair():
    base = torch.zeros(10)
    tt.no_overlap(["a", "b", "c"], [base[:5], base[5:], base[5:5]])
    with pytest.raises(ValueError, match="b and c share memory"):
        tt.no_overlap(["a", "b", "c"], [torch.zeros(3), base[:6], base[5:]])


def test_import_optcore_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, optcore, optcore.kernels, optcore.clip; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
