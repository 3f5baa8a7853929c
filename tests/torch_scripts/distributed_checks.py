"""optcore.torch optimizers under torch.distributed (gloo, 2 processes on this machine).

Run by tests/test_torch_distributed.py as ``python distributed_checks.py OUTDIR``.
Every case trains the same small MLP for STEPS steps in two ways:

- distributed: 2 processes spawned with torch.multiprocessing, each with half of every batch,
  the model wrapped in DistributedDataParallel, the optimizer plain (``ddp-*``) or a
  ZeroRedundancyOptimizer with the optimizer as ``optimizer_class`` (``zero-*``);
- one process: the same model and optimizer, the gradient of each half-batch accumulated and
  halved, which is what DDP's all-reduce computes for 2 ranks (a + b, then / 2, both exact
  to the bit in any order), so the parameters must agree bitwise.

Results go to OUTDIR/results.pt: per case, the final parameters of rank 0, rank 1 and the
single process; for ZeRO cases also (under ``case/state``) the optimizer state consolidated
on rank 0 and the single process's optimizer state (``state_dict()["state"]``). Everything runs on one thread per process, so it is deterministic.
"""
import copy
import importlib
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 12
WORLD = 2
OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "Adagrad": dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-3),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=1e-3),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "Adamax": dict(lr=0.01),
    "NAdam": dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True),
}
CASES = ([f"ddp-{n}" for n in OPTIMIZERS] + [f"zero-{n}" for n in OPTIMIZERS]
         + ["zero-bucket-Adam", "zero-reload-Adam", "zero-reload-RMSprop", "ddp-clip-Adam",
            "zero-clip-Adam", "ddp-fusedclip-Adam", "ddp-fusedclip-NAdam"])
# ``reload`` cases save the optimizer state half-way (ZeRO: consolidated on rank 0 and sent to
# every rank), build a new optimizer, load the state into it and train on.
# Not a case: ZeRO with a fused ``clip=GlobalNorm``. Each rank's optimizer sees only its shard,
# so it would clip by the shard's norm: the optimizer refuses it (tested in
# test_torch_distributed.py); clip_grad_norm_ on the whole model before ZeRO's step is the
# exact way (the ``zero-clip-Adam`` case).


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(2 * 8, 8, generator=g)
    return x, torch.sin(x[:, :4]) + 0.1 * x[:, 4:]


def loss_of(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def parse(case):
    """(kind, optimizer name, ZeRO bucket view)."""
    kind, *rest = case.split("-")
    return kind, rest[-1], "bucket" in rest


def options(case):
    """The optimizer's arguments; ``fusedclip`` cases clip inside the step (optcore only)."""
    name = parse(case)[1]
    if "fusedclip" in case:
        import optcore.clip
        return dict(OPTIMIZERS[name], clip=optcore.clip.GlobalNorm(0.05), nonfinite="skip")
    return OPTIMIZERS[name]


def make_optimizer(module, case, params):
    kind, name, bucket = parse(case)
    cls = getattr(module, name)
    if kind == "zero":
        return ZeroRedundancyOptimizer(params, optimizer_class=cls,
                                       parameters_as_bucket_view=bucket, **options(case))
    return cls(params, **options(case))


def clip(module_name, params):
    if module_name == "optcore.torch":
        import optcore.torch as ot
        ot.clip_grad_norm_(params, 0.05)
    else:
        torch.nn.utils.clip_grad_norm_(params, 0.05)


def run_rank(rank, outdir, module_name, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{outdir}/rendezvous", rank=rank,
                            world_size=WORLD)
    module = importlib.import_module(module_name)
    out = {}
    for case in cases:
        net = DDP(model())
        opt = make_optimizer(module, case, net.parameters())
        for step in range(STEPS):
            if "reload" in case and step == STEPS // 2:
                opt.consolidate_state_dict(to=0)
                saved = [opt.state_dict() if rank == 0 else None]
                dist.broadcast_object_list(saved, src=0)
                opt = make_optimizer(module, case, net.parameters())
                opt.load_state_dict(saved[0])
            x, y = batch(step)
            half = slice(rank * 8, (rank + 1) * 8)
            opt.zero_grad()
            loss_of(net, x[half], y[half]).backward()
            if "-clip-" in case:
                clip(module_name, net.parameters())
            opt.step()
        out[case] = [p.detach().clone() for p in net.module.parameters()]
        if isinstance(opt, ZeroRedundancyOptimizer):
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                out[case + "/state"] = opt.state_dict()["state"]
    torch.save(out, f"{outdir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_single(module_name, cases):
    torch.set_num_threads(1)
    module = importlib.import_module(module_name)
    out = {}
    for case in cases:
        name = parse(case)[1]
        net = model()
        opt = getattr(module, name)(net.parameters(), **options(case))
        for step in range(STEPS):
            if "reload" in case and step == STEPS // 2:
                saved = copy.deepcopy(opt.state_dict())
                opt = getattr(module, name)(net.parameters(), **options(case))
                opt.load_state_dict(saved)
            x, y = batch(step)
            opt.zero_grad()
            for r in range(WORLD):
                half = slice(r * 8, (r + 1) * 8)
                loss_of(net, x[half], y[half]).backward()
            for p in net.parameters():
                p.grad.mul_(1.0 / WORLD)
            if "-clip-" in case:
                clip(module_name, net.parameters())
            opt.step()
        out[case] = [p.detach().clone() for p in net.parameters()]
        out[case + "/state"] = opt.state_dict()["state"]
    return out


def main(outdir, module_name="optcore.torch"):
    """``module_name="torch.optim"`` runs the harness on torch's optimizers (no fused-clip
    cases then): a check of the harness itself."""
    cases = [c for c in CASES if module_name == "optcore.torch" or "fusedclip" not in c]
    mp.spawn(run_rank, args=(outdir, module_name, cases), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{outdir}/rank{r}.pt") for r in range(WORLD)]
    single = run_single(module_name, cases)
    results = {c: (ranks[0][c], ranks[1][c], single[c]) for c in cases}
    results.update({c + "/state": (ranks[0][c + "/state"], single[c + "/state"])
                    for c in cases if c.startswith("zero")})
    torch.save(results, f"{outdir}/results.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
