"""Several processes (``accelerate launch``, 2 CPU processes on gloo) give exactly the one-process numbers.

``accelerate launch --multi_gpu --num_processes 2`` starts the processes with torchrun; on a machine without
a GPU :mod:`cleansight_analysis.evaluation.distributed` makes accelerate's state on the CPU (gloo).
(``accelerate launch --cpu --num_processes 2`` starts ONE process unless MPI is set up: accelerate's
simple launcher.) The test set has an odd number of batches, so the processes get unequal shares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cleansight_analysis import distributed
from cleansight_analysis.errors import InputError
from cleansight_analysis.evaluation import runner as R

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
#: Columns that are wall times (or made from them) or say how the run was made: not compared.
TIMING = {"latency_ratio", "seconds_defended", "seconds_undefended", "fit_seconds", "processes"}
#: 40 calibration scenes are 3 of CleanSight's calibration batches (16): the shared-out fit is uneven too.
EVALUATE = ["evaluate", "--model", "tiny-llava/badnet", "--defense", "cleansight", "--n", "10", "--val", "40",
            "--batch-size", "2", "--max-new-tokens", "6"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "cleansight_analysis.cli", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "cleansight_analysis.cli", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def test_two_processes_give_the_one_process_row(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _launch([*EVALUATE, "--json", str(one)], 1)
    launched = _launch([*EVALUATE, "--json", str(two)], 2)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert "processes" not in a and b["processes"] == 2
    assert _numbers(a) == _numbers(b)  # exactly: answers, flags, scores and pruned counts in sample order
    assert a["defense"]["gamma"] == b["defense"]["gamma"]  # the shared-out calibration is the same fit
    assert a["n"] == 10 and a["tpr"] == a["tpr"]  # a detector row with real numbers
    assert launched.stdout.count('"asr"') == 1  # only the main process prints the row


def test_not_launched_runs_every_batch_in_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched()
    assert distributed.rank_and_world() == (0, 1) and distributed.is_main() and distributed.device() is None
    assert distributed.my_batches(7, 2) == [0, 2, 4, 6]
    assert distributed.gather({"x": 1}) == [{"x": 1}]
    distributed.barrier()


def test_map_batches_runs_everything_here_unless_shared_and_launched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []

    def fn(start):
        seen.append(start)
        return start * 10

    with distributed.shared_work():  # not launched: still every batch, here
        assert not distributed.sharing()
        assert distributed.map_batches(fn, 7, 2) == [0, 20, 40, 60] and seen == [0, 2, 4, 6]
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        distributed.map_batches(fn, 7, 0)


@pytest.mark.parametrize("rank", [0, 1])
def test_map_batches_shares_out_and_restores_batch_order(monkeypatch, rank):
    """Two ranks as accelerate would split them: rank 0 computes [0, 2], rank 1 [4, 6]; all get every result."""
    shares = {0: [0, 2], 1: [4, 6]}
    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(distributed, "my_batches", lambda n, b: shares[rank])
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)
    monkeypatch.setattr(distributed, "gather", lambda local: [[s * 10 for s in shares[r]] if r != rank else local
                                                              for r in (0, 1)])
    seen = []

    def fn(start):
        seen.append(start)
        return start * 10

    assert distributed.map_batches(fn, 7, 2) == [0, 20, 40, 60] and seen == [0, 2, 4, 6]  # outside: all here
    seen.clear()
    with distributed.shared_work():
        with distributed.shared_work():  # nested blocks are fine
            assert distributed.map_batches(fn, 7, 2) == [0, 20, 40, 60]
        assert distributed.sharing()
    assert seen == shares[rank] and not distributed.sharing()


def test_fusion_onset_profile_goes_through_map_batches_in_batch_order(monkeypatch):
    """The layer choice computes per batch through map_batches (so a launched fit shares it out) and adds the
    per-batch sums in batch order: shares computed in another order give the same bits."""
    import cleansight_analysis as cs
    from cleansight_analysis.defenses.layers import fusion_onset_profile

    model = cs.load_lvlm("tiny-llava/badnet")
    samples = R.synthetic_samples("calibration", 5, 0)
    whole = fusion_onset_profile(model, samples, batch_size=2)
    calls = []

    def split(fn, n, batch_size, **kw):
        calls.append((n, batch_size))
        starts = list(range(0, n, batch_size))
        second = [fn(s) for s in starts[2:]]  # "rank 1" finishes first
        first = [fn(s) for s in starts[:2]]   # "rank 0"
        return first + second                 # gathered in rank order = batch order

    monkeypatch.setattr(distributed, "map_batches", split)
    assert np.array_equal(fusion_onset_profile(model, samples, batch_size=2), whole) and calls == [(5, 2)]


def test_not_launched_imports_no_accelerate():
    code = ("import sys, cleansight_analysis.cli, cleansight_analysis.evaluation.runner; "
            "print('accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_merge_restores_order_and_missing_outputs():
    a = R.ConditionRun(["a", "b"], flags=np.array([True, False]), scores=np.array([0.5, 0.1]),
                       pruned=np.array([3, 0]), seconds=1.0)
    b = R.ConditionRun(["c"], flags=np.array([True]), scores=None, pruned=np.array([2]), seconds=0.5)
    merged = R._merge([a, None, b])  # a process without batches gives None
    assert merged.texts == ["a", "b", "c"] and merged.seconds == 1.5
    assert merged.flags.tolist() == [True, False, True] and merged.pruned.tolist() == [3, 0, 2]
    assert merged.scores is None  # one share without scores: no scores, as in one process
