"""EMAOptimizer with FSDP2 and torch.distributed.checkpoint (DCP), on CPU with gloo.

Trains a small regression MLP sharded with ``fully_shard`` on 2 processes, saves model,
optimizer and EMA shadows with DCP, evaluates the EMA weights, then loads the same
checkpoint into an unsharded model in a single process (resharding 2 -> 1)::

    python examples/fsdp2_dcp.py /tmp/ema-ckpt                            # spawns 2 processes
    torchrun --nproc-per-node 2 examples/fsdp2_dcp.py /tmp/ema-ckpt --no-reload

On GPUs: use the "nccl" backend, ``init_device_mesh("cuda", ...)`` and move the model to
its GPU before ``fully_shard``; nothing changes for the optimizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ema_optim import EMAOptimizer


def build(mesh=None):
    """The model (FSDP2-sharded over ``mesh`` if given) and its EMA-wrapped optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    if mesh is not None:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # Build the optimizer after fully_shard: it must see the sharded (DTensor) params.
    # The shadows are then DTensors sharded like the params: EMA memory per rank is 1/world.
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-2), decay=0.9)
    return model, opt


def data(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :4].sum(dim=1, keepdim=True)


def evaluate(model) -> float:
    x, y = data(-1, 0)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def save_checkpoint(model, opt, path: str) -> None:
    """Model, inner optimizer state and EMA shadows; every rank writes its own shards."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(model, opt, path: str) -> None:
    """Load a checkpoint of :func:`save_checkpoint` on any number of ranks (resharding).

    A checkpoint of the plain inner optimizer (no EMA shadows) loads too: the EMA then
    restarts from the loaded weights at the next step, with a UserWarning, as
    ``opt.load_state_dict`` does for a plain state dict.
    """
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    # DCP loads *into* this template and raises CheckpointException for template keys that
    # the checkpoint lacks: drop the EMA keys it lacks (a checkpoint of the plain inner
    # optimizer, or one saved without buffers=); what is dropped restarts, with a warning.
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for fqn, param_state in state["optim"]["state"].items():
        for key in [k for k in param_state if k.startswith("ema") and f"optim.state.{fqn}.{k}" not in keys]:
            del param_state[key]
    if not any(k.startswith("optim.state.") and k.endswith(".ema") for k in keys):
        for group in state["optim"]["param_groups"]:
            for counter in [k for k in group if k.startswith("ema_")]:
                del group[counter]
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    # set_optimizer_state_dict drops the state of params with requires_grad=False, but
    # frozen params have shadows too: let it see them as trainable while it loads.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        set_optimizer_state_dict(model, opt, state["optim"])
    finally:
        for p in frozen:
            p.requires_grad_(False)


def train_and_save(rank: int, world: int, path: str, steps: int) -> None:
    mesh = init_device_mesh("cpu", (world,))
    model, opt = build(mesh)
    for step in range(steps):
        x, y = data(step, rank)  # each rank its own batch
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(model, opt, path)
    online = evaluate(model)
    with opt.swap_ema_weights():  # every rank swaps its own shards
        ema = evaluate(model)
    if rank == 0:
        print(f"{world} ranks, {steps} steps: online loss {online:.4f}, EMA loss {ema:.4f}")


def _spawned(rank: int, world: int, port: int, path: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_and_save(rank, world, path, steps)
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown in the worker: gloo's threads sometimes abort it
    # ("terminate called without an active exception") after a clean run.
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-reload", action="store_true", help="skip the single-process reload")
    args = parser.parse_args()

    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        try:
            train_and_save(dist.get_rank(), dist.get_world_size(), args.path, args.steps)
        finally:
            dist.destroy_process_group()
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(2, port, args.path, args.steps), nprocs=2)

    if not args.no_reload and "RANK" not in os.environ:
        # Resharding 2 -> 1: an unsharded model in a process without a process group.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        model, opt = build()
        load_checkpoint(model, opt, args.path)
        online = evaluate(model)
        with opt.swap_ema_weights():
            ema = evaluate(model)
        print(f"reloaded in 1 process: online loss {online:.4f}, EMA loss {ema:.4f}")


if __name__ == "__main__":
    main()
