"""optcore.torch optimizers under torch.distributed: DistributedDataParallel and
ZeroRedundancyOptimizer (``optimizer_class``), gloo backend, 2 processes on this machine.

One launch of ``tests/torch_scripts/distributed_checks.py`` (process start-up and torch's
import dominate) runs every case; each is reported here as one test. For 2 ranks the
all-reduced gradient, (a + b) / 2, is computed bitwise the same by one process accumulating
the two half-batch gradients and halving them, so the parameters must agree to the bit.
"""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

SCRIPT = Path(__file__).parent / "torch_scripts" / "distributed_checks.py"
sys.path.insert(0, str(SCRIPT.parent))
with warnings.catch_warnings():  # torch.distributed.optim warns about torch.jit (torch's code)
    warnings.simplefilter("ignore", DeprecationWarning)
    import distributed_checks as checks  # noqa: E402
sys.path.pop(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("torch-distributed")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(outdir)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{SCRIPT.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return torch.load(outdir / "results.pt")


@pytest.mark.parametrize("case", checks.CASES)
def test_same_parameters_as_one_process(results, case):
    rank0, rank1, single = results[case]
    assert len(rank0) == len(single) == 6
    for a, b, s in zip(rank0, rank1, single):
        assert torch.equal(a, b), "the two ranks disagree"
        assert torch.equal(a, s), f"max difference {(a - s).abs().max().item():.3g}"
    assert not torch.equal(single[0], checks.model()[0].weight.detach()), "nothing was trained"


@pytest.mark.parametrize("case", [c for c in checks.CASES if c.startswith("zero")])
def test_zero_consolidated_state_is_the_single_process_state(results, case):
    zero, single = results[case + "/state"]
    assert sorted(zero) == sorted(single) and len(single) == 6
    for i in single:
        assert sorted(zero[i]) == sorted(single[i])
        for key, value in single[i].items():
            assert torch.equal(torch.as_tensor(zero[i][key]), torch.as_tensor(value)), (i, key)


@pytest.mark.parametrize("options", [
    {"clip": "GlobalNorm"}, {"nonfinite": "skip"},
])
def test_zero_refuses_decisions_over_all_parameters(tmp_path, options):
    """Per-tensor policies are exact on a shard; a global norm or a skip decision is not, so
    optcore refuses them when ZeroRedundancyOptimizer builds the optimizer."""
    import optcore.clip
    import optcore.torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if "clip" in options:
        options = {"clip": optcore.clip.GlobalNorm(1.0)}
    net = torch.nn.Linear(4, 3)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous",
                                         rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="ZeroRedundancyOptimizer"):
            ZeroRedundancyOptimizer(net.parameters(), optimizer_class=optcore.torch.Adam,
                                    lr=1e-3, **options)
        ZeroRedundancyOptimizer(net.parameters(), optimizer_class=optcore.torch.Adam, lr=1e-3,
                                clip=optcore.clip.PerTensorNorm(1.0))
        optcore.torch.Adam(net.parameters(), lr=1e-3, **options)  # not sharded: fine
    finally:
        torch.distributed.destroy_process_group()
