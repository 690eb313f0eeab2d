"""Data-parallel training on the CPU cores of one machine (``torch.distributed`` with gloo).

On small CPU machines one torch thread per process is fastest (two OpenMP threads stall), so the
tiny recipe uses one *process* per core instead: each process computes the gradient of its shard of
the batch, the gradients are averaged with one all-reduce, and every process applies the same
update (the weights stay identical). With one process everything runs in-process as usual.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def shard(indices: Sequence[Any]) -> list[Any]:
    """This process's share of a batch (every ``world``-th item starting at ``rank``)."""
    rank, world = rank_and_world()
    return list(indices)[rank::world]


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average gradients over processes with one flat all-reduce (no-op with one process)."""
    _, world = rank_and_world()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _worker(rank: int, world: int, init_file: str, result_file: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            Path(result_file).write_text(json.dumps(result, default=str))
    except BaseException:
        Path(result_file + f".error{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_parallel(fn: Callable[..., Any], args: tuple = (), *, processes: int = 2) -> Any:
    """Run ``fn(*args)`` in ``processes`` data-parallel processes; returns rank 0's (JSON) result.

    ``fn`` must be importable (a module-level function) and use :func:`shard` /
    :func:`average_gradients` (the training loops here do).
    """
    if processes <= 1:
        return fn(*args)

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = str(Path(tmp) / "init"), str(Path(tmp) / "result.json")
        procs = [ctx.Process(target=_worker, args=(r, processes, init_file, result_file, fn, args))
                 for r in range(processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        errors = sorted(Path(tmp).glob("result.json.error*"))
        if errors or any(p.exitcode != 0 for p in procs):
            detail = errors[0].read_text() if errors else f"exit codes {[p.exitcode for p in procs]}"
            raise RuntimeError(f"data-parallel training failed:\n{detail}")
        return json.loads(Path(result_file).read_text())
