"""optcore.torch.training and ``optcore bench --training``: the models, the variants' steps,
the loss check and the table (tiny models)."""
import json

import pytest

torch = pytest.importorskip("torch")
from optcore.cli import main  # noqa: E402
from optcore.torch import models, training  # noqa: E402


def test_models_shapes_and_fusable_pairs():
    net = models.ResNet18(width=4)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 20
    mlp = models.MLP(in_features=16, width=8, depth=3)
    assert mlp(torch.randn(5, 16)).shape == (5, 10)
    fused = training.make_variant(3, "resnet18", "adam", True)[0]
    # stem + the first conv of each of the 8 blocks are followed by a ReLU
    assert sum(type(m).__name__ == "BatchNormReLU2d" for m in fused.modules()) == 9
    assert sum(type(m).__name__ == "BatchNorm2d" for m in fused.modules()) == 11


@pytest.mark.parametrize("model", list(training.MODELS))
def test_variants_start_equal_and_train_alike(model):
    setups = [training.make_variant(v, model, "nadam", True) for v in range(4)]
    ref = setups[0][0].state_dict()
    for net, _, _ in setups[1:]:
        for k, v in net.state_dict().items():
            assert torch.equal(v, ref[k]), k
    losses = [[training.train_step(net, opt, *batches[s % len(batches)], torch_clip=i == 0)[0]
               for s in range(4)] for i, (net, opt, batches) in enumerate(setups)]
    for other in losses[1:]:
        # float32 batch norms summing in another order: ~1e-7 relative per step
        assert other == pytest.approx(losses[0], rel=1e-5)
    assert losses[0][-1] != losses[0][0]  # it trains


def test_bench_training_cli_prints_the_table(tmp_path, capsys):
    out_file = tmp_path / "training.json"
    code = main(["bench", "--training", "--quick", "--optimizers", "adam", "--no-progress",
                 "--json", str(out_file)])
    out = capsys.readouterr().out
    assert code == 0
    for col in ("model", "variant", "step ms", "x (a)", "BN %", "optim %", "loss diff"):
        assert col in out
    for v in training.VARIANTS:
        assert out.count(v) == len(training.MODELS)
    assert "torch drift" in out and "own drift at another thread count: yes" in out
    data = json.loads(out_file.read_text())
    assert data["losses_agree"] and len(data["rows"]) == 4 * len(training.MODELS)
    for r in data["rows"]:
        assert r["step_s"] > 0 and 0 < r["optim_share"] < 1 and r["bn_share"] > 0
        assert len(r["losses"]) == 6 and r["torch_drift"] >= 0
        if r["variant"] == training.VARIANTS[0]:
            assert r["speedup"] == 1.0 and r["loss_rel_diff"] == 0.0


def test_bench_training_bad_arguments(capsys):
    assert main(["bench", "--training", "--optimizers", "sgd", "--quick"]) == 2
    assert "not ['sgd']" in capsys.readouterr().err
    assert main(["bench", "--training", "--threads", "1,2", "--quick"]) == 2
    assert main(["bench", "--training", "--models", "vgg", "--quick"]) == 2
    assert "not ['vgg']" in capsys.readouterr().err
    assert main(["bench", "--training", "--quick", "--steps", "2"]) == 2
    assert "steps must exceed warmup" in capsys.readouterr().err
