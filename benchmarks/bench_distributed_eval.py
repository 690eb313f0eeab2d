"""Benchmark: wall time of ``cleansight evaluate`` in one process vs several (``accelerate launch``); goal
<= 0.6x with 2 processes.

Both runs are the whole command as a user types it (start-up, model load, calibration, test runs, JSON):

- one process: ``python -m cleansight_analysis.cli evaluate --model M --defense cleansight --n N --val V``;
- N processes: ``accelerate launch --multi_gpu --num_processes P -m cleansight_analysis.cli evaluate ...``
  (on a machine without a GPU the processes run on the CPU with gloo; ``--cpu --num_processes 2`` would
  start one process: accelerate's simple launcher).

The runs alternate (``--repeats`` times each) and the best wall time of each is kept. The machine's load
(``os.getloadavg``) is recorded before and after, since other jobs share the cores. The two rows are
checked to be equal outside the timing columns. The calibration batches (CleanSight's fusion-onset layer
choice and its clean features) are shared out between the processes too and gathered for one fit
(:func:`cleansight_analysis.distributed.shared_work`); start-up and model loading are not split. A second
measurement with a small calibration set (``--val 200,32``) shows the test runs' share alone. Start-up (import
and model load in one process) and the launcher's own overhead are measured on their own (``fixed_seconds``),
and each run records ``best_possible_ratio``: what a perfect split of everything else would reach.
Run: ``python benchmarks/bench_distributed_eval.py [--n 256] [--processes 2]``; the result goes to
``benchmarks/results/distributed_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"latency_ratio", "seconds_defended", "seconds_undefended", "fit_seconds", "processes"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The environment of a launched run: no inherited process-group variables, one thread, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    return env


def _run(args: list[str], processes: int, out: Path) -> tuple[float, dict]:
    env = _env()
    if processes == 1:
        cmd = [sys.executable, "-m", "cleansight_analysis.cli", *args, "--json", str(out)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "cleansight_analysis.cli", *args, "--json", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(out.read_text())


def fixed_costs(opts: argparse.Namespace) -> dict:
    """What no split can shorten, measured on its own (best of ``--repeats``): ``startup_s``, one process
    importing the package and loading the model (every launched process pays it, in parallel), and
    ``launcher_s``, ``accelerate launch`` starting and ending ``--processes`` processes that do nothing
    (the launcher imports torch and accelerate before it starts them)."""
    env = _env()
    load = f"import cleansight_analysis as cs; cs.load_lvlm({opts.model!r})"
    walls: dict[str, list[float]] = {"startup_s": [], "launcher_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        noop = Path(tmp) / "noop.py"
        noop.write_text("pass\n")
        for _ in range(opts.repeats):
            for key, cmd in (("startup_s", [sys.executable, "-c", load]),
                             ("launcher_s", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                             "--num_processes", str(opts.processes), "--num_machines", "1",
                                             "--mixed_precision", "no", "--dynamo_backend", "no",
                                             "--main_process_port", str(_free_port()), str(noop)])):
                start = time.perf_counter()
                done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                walls[key].append(round(time.perf_counter() - start, 2))
    return {key: min(v) for key, v in walls.items()}


def measure(opts: argparse.Namespace, val: int) -> dict:
    """Both launches of ``evaluate`` with ``val`` calibration samples; wall times, load and checks."""
    args = ["evaluate", "--model", opts.model, "--defense", opts.defense, "--n", str(opts.n), "--val", str(val),
            "--batch-size", str(opts.batch_size)]
    load_before = os.getloadavg()
    walls: dict[int, list[float]] = {1: [], opts.processes: []}
    rows: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.repeats):
            for p in (1, opts.processes):
                wall, rows[p] = _run(args, p, Path(tmp) / f"row{p}_{r}.json")
                walls[p].append(round(wall, 2))
                print(f"--val {val}, {p} process(es): {wall:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    load_after = os.getloadavg()
    one, many = rows[1], rows[opts.processes]
    same = {k: v for k, v in one.items() if k not in TIMING} == {k: v for k, v in many.items() if k not in TIMING}
    best1, bestp = min(walls[1]), min(walls[opts.processes])
    return {
        "command": "cleansight " + " ".join(args),
        "wall_seconds": {"1": walls[1], str(opts.processes): walls[opts.processes]},
        "best_wall_seconds": {"1": best1, str(opts.processes): bestp},
        "ratio": round(bestp / best1, 3),
        "fit_seconds": {"1": one["fit_seconds"], str(opts.processes): many["fit_seconds"]},
        "fit_share_one_process": round(one["fit_seconds"] / best1, 3),
        # prepare + generate time of the three test runs, summed over the processes: about equal when the
        # processes each had a core of their own, larger when they shared cores (other jobs, or too few cores)
        "run_seconds_summed_over_processes": {str(p): round(r["seconds_defended"] * 2 + r["seconds_undefended"], 2)
                                              for p, r in ((1, one), (opts.processes, many))},
        "rows_equal_outside_timing": same,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava/badnet")
    parser.add_argument("--defense", default="cleansight")
    parser.add_argument("--n", type=int, default=256, help="test samples (each also run with its trigger)")
    parser.add_argument("--val", default="200,32",
                        help="comma-separated calibration sizes, one measurement each (the first is the headline)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_eval.json"))
    opts = parser.parse_args()
    runs = [measure(opts, int(v)) for v in opts.val.split(",")]
    fixed = fixed_costs(opts)
    for run in runs:
        # the best ratio a perfect split of everything after start-up could reach: the launcher, then one
        # start-up (in parallel in every process), then 1/P of the rest of the one-process run
        one = run["best_wall_seconds"]["1"]
        run["best_possible_ratio"] = round((fixed["launcher_s"] + fixed["startup_s"]
                                            + (one - fixed["startup_s"]) / opts.processes) / one, 3)
    result = {
        "processes": opts.processes,
        "launcher": f"accelerate launch --multi_gpu --num_processes {opts.processes} (CPU, gloo)",
        "goal_ratio": 0.6,
        "ratio": runs[0]["ratio"],
        "fixed_seconds": fixed,
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_process": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip() or None,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not all(r["rows_equal_outside_timing"] for r in runs):
        raise SystemExit("the rows differ outside the timing columns")


if __name__ == "__main__":
    main()
