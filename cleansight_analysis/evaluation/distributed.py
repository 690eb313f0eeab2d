"""Several processes for one evaluation (``accelerate launch``): who am I, my share, gather the records.

Under ``accelerate launch --num_processes N ... -m cleansight_analysis.cli evaluate ...`` (or ``torchrun``)
every process runs the same command: it loads the model, fits the defense (identically: every ``fit`` of
this package is a deterministic function of the model, settings and validation samples, so the N fits are
ONE calibration), and :func:`~cleansight_analysis.evaluation.runner.run_defense` runs only this process's
share of the batches. The per-sample records (answers, flags, scores, pruned counts) and timings are
gathered to every process and put back in sample order, so every process computes the same metrics; only
the main process (:func:`is_main`) writes tables, manifests and JSON.

The rules (one copy each):

- **launched**: ``WORLD_SIZE`` (set by ``accelerate launch`` / ``torchrun``) is above 1. Without it
  nothing here imports :mod:`accelerate` or touches ``torch.distributed``: one process behaves exactly as
  before (rank 0 of 1, every batch, no gather).
- **split**: whole batches (``range(0, n, batch_size)``) are shared out contiguously with
  ``accelerate.PartialState().split_between_processes``, so every batch holds the same samples as in a
  one-process run (batch padding cannot change an answer) and concatenating the gathered shares in rank
  order restores sample order.
- **gather**: ``accelerate.utils.gather_object`` (``all_gather_object`` over gloo on CPU, NCCL on GPUs).

The training helper :mod:`cleansight_analysis.training.parallel` is the other use of ``torch.distributed``
in this package: it starts its own gloo workers for data-parallel training (rank from
``torch.distributed``); this module follows a launcher's processes (rank from accelerate's state).
"""

from __future__ import annotations

import os
from typing import Any

import torch


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


__all__ = ["barrier", "device", "gather", "is_main", "launched", "my_batches", "rank_and_world"]
