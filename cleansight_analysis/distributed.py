"""Several processes for one evaluation (``accelerate launch``): who am I, my share, gather the records.

Under ``accelerate launch --num_processes N ... -m cleansight_analysis.cli evaluate ...`` (or ``torchrun``)
every process runs the same command: it loads the model and fits the defense together with the others,
then :func:`~cleansight_analysis.evaluation.runner.run_defense` runs only this process's share of the test
batches. The per-sample records (answers, flags, scores, pruned counts) and timings are gathered to every
process and put back in sample order, so every process computes the same metrics; only the main process
(:func:`is_main`) writes tables, manifests and JSON.

**One calibration, shared out.** Inside :func:`shared_work` (the evaluation runner enters it around
``defense.fit``), :func:`map_batches` gives each process its share of the calibration batches too (CleanSight's
fusion-onset layer choice and its clean features) and gathers the per-batch results to every process in batch
order; every process then makes the same, single fit from the same numbers in the same order, so the fit is
bit-identical to a one-process fit. Outside :func:`shared_work` (or when not launched) :func:`map_batches` runs
every batch in this process, so code that only the main process runs (``cleansight analyze``) never waits for
the others.

The rules (one copy each):

- **launched**: ``WORLD_SIZE`` (set by ``accelerate launch`` / ``torchrun``) is above 1. Without it
  nothing here imports :mod:`accelerate` or touches ``torch.distributed``: one process behaves exactly as
  before (rank 0 of 1, every batch, no gather).
- **split**: whole batches (``range(0, n, batch_size)``) are shared out contiguously with
  ``accelerate.PartialState().split_between_processes``, so every batch holds the same samples as in a
  one-process run (batch padding cannot change an answer) and concatenating the gathered shares in rank
  order restores sample order.
- **gather**: ``accelerate.utils.gather_object`` (``all_gather_object`` over gloo on CPU, NCCL on GPUs).

This module sits below every other part of the package (models, detection, defenses and evaluation all
use it). The training helper :mod:`cleansight_analysis.training.parallel` is the other use of
``torch.distributed`` in this package: it starts its own gloo workers for data-parallel training (rank from
``torch.distributed``); this module follows a launcher's processes (rank from accelerate's state).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
from tqdm.auto import tqdm

from .errors import InputError

T = TypeVar("T")
#: Depth of the :func:`shared_work` blocks this process is in (0: :func:`map_batches` runs every batch here).
_SHARED_DEPTH = 0


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` / ``torchrun``."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _on_cpu() -> bool:
    """Processes run on the CPU (gloo): no GPU here, or ``ACCELERATE_USE_CPU`` set."""
    return (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            or not torch.cuda.is_available())


def _state() -> Any:
    # lazy on purpose: accelerate (~0.5 s, and it sets up torch.distributed) only when launched distributed
    from accelerate import PartialState

    # accelerate makes a process group on the CPU only when told to (cpu=True); the state is a singleton
    return PartialState(cpu=_on_cpu())


def rank_and_world() -> tuple[int, int]:
    """``(process index, number of processes)``; ``(0, 1)`` when not launched."""
    if not launched():
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def is_main() -> bool:
    """Whether this process writes results (always, when not launched)."""
    return rank_and_world()[0] == 0


def device() -> str | None:
    """This process's device when launched (``cuda:<local rank>`` on GPUs; ``cpu`` without a GPU or with
    ``ACCELERATE_USE_CPU``), else None (the loader's default)."""
    return str(_state().device) if launched() else None


def my_batches(n: int, batch_size: int) -> list[int]:
    """Start indices of this process's batches of ``range(0, n, batch_size)`` (all of them when not launched)."""
    starts = list(range(0, n, batch_size))
    if not launched():
        return starts
    with _state().split_between_processes(starts) as mine:
        return list(mine)


def gather(record: Any) -> list[Any]:
    """Every process's ``record``, in process order (``[record]`` when not launched)."""
    if not launched():
        return [record]
    # lazy on purpose: see _state
    from accelerate.utils import gather_object

    return list(gather_object([record]))


def barrier() -> None:
    """Wait for every process (no-op when not launched)."""
    if launched():
        _state().wait_for_everyone()


@contextmanager
def shared_work() -> Iterator[None]:
    """Inside this block :func:`map_batches` shares its batches out between the launched processes.

    Every process must enter it and make the same :func:`map_batches` calls in the same order (they are
    collective). The evaluation runner wraps ``defense.fit`` in it; nested blocks are allowed.
    """
    global _SHARED_DEPTH
    _SHARED_DEPTH += 1
    try:
        yield
    finally:
        _SHARED_DEPTH -= 1


def sharing() -> bool:
    """Whether :func:`map_batches` splits its batches now (launched, and inside :func:`shared_work`)."""
    return _SHARED_DEPTH > 0 and launched()


def map_batches(fn: Callable[[int], T], n: int, batch_size: int, *, progress: bool = False,
                desc: str | None = None) -> list[T]:
    """``[fn(start) for start in range(0, n, batch_size)]``, computed in shares when :func:`sharing`.

    ``fn(start)`` computes the batch of items ``start .. start + batch_size - 1``; its result must be
    picklable (arrays, tensors, numbers). When sharing, this process computes :func:`my_batches` and every
    process receives all results in batch order, so callers combine them exactly as in one process.

    Args:
        progress: a progress bar over this process's batches (shown by the main process only).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    starts = my_batches(n, batch_size) if sharing() else list(range(0, n, batch_size))
    if progress and is_main():
        starts = tqdm(starts, desc=desc, mininterval=2.0)
    local = [fn(start) for start in starts]
    if not sharing():
        return local
    return [result for share in gather(local) for result in share]


__all__ = ["barrier", "device", "gather", "is_main", "launched", "map_batches", "my_batches", "rank_and_world",
           "shared_work", "sharing"]
