"""What the benchmarks share: the LLaVA-1.5-shaped CPU benchmark model, the machine, and paired timing.

**Model.** A randomly initialised (seed 0) LLaVA-1.5-shaped model: CLIP-style tower at 336 px with 14 px
patches (576 image tokens, 2 layers of width 64), Llama LM with d_model 1024, 8 layers, 16 heads, MLP 2816,
vocabulary 32064 (170 M parameters). LLaVA-1.5's prompt template makes prompts of about 620 tokens.

**Paired timing.** The development machine is shared: other jobs load its 2 cores, and in one 20-minute
run wall-clock times of one and the same call varied by 2x and process CPU times by 25 %. So every mode
runs in its own process (a :class:`Worker` that builds its model once and then times one call per
request), and its calls alternate with calls of the reference process (the untouched HF model with SDPA),
which stays alive for the whole run: a mode's ratio compares calls made minutes, not tens of minutes,
apart. Each call reports process CPU time (one torch thread: the work done; the ratios use it), wall-clock
time and peak memory.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence


def build_model():
    """``(hf_model, processor)``: the benchmark model with eager attention configured (untouched)."""
    import torch

    from cleansight_analysis.models import tiny

    torch.set_num_threads(1)
    cfg = tiny.tiny_llava_config(image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, hidden=1024,
                                 layers=8, heads=16, vocab_size=32064, initializer_range=0.02)
    cfg.text_config.intermediate_size = 2816
    return tiny.build_tiny_random(cfg, seed=0)


def machine() -> dict:
    """CPU model, cores, memory and load average (the development machine is shared with other jobs)."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
               platform.processor())
    mem = -1
    if Path("/proc/meminfo").exists():
        mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), -1)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_total_mib": mem, "loadavg": load}


def rss_kib(field: str = "VmRSS", missing: int | None = None) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, ``VmHWM``: the peak); ``missing`` when the
    field or the file is absent (``None``: raise)."""
    path = Path("/proc/self/status")
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    if missing is None:
        raise RuntimeError(f"{field} is not in /proc/self/status")
    return missing


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def serve(measure: Callable[[], dict]) -> None:
    """Worker side: answer every ``run`` line on stdin with one JSON line of ``measure()``; stop at ``quit``."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps(measure()), flush=True)


class Worker:
    """A benchmark mode in its own process (``script --serve ARGS``), timed one call per :meth:`call`."""

    def __init__(self, script: str, args: Sequence[str]):
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, script, "--serve", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.proc.args[2:]} died:\n{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def call(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=120)


def paired(ref: Worker, worker: Worker, rounds: int) -> tuple[dict, list[dict], list[dict]]:
    """``(first call, mode calls, reference calls)``: one untimed-for-ratio first call of the mode, then
    ``rounds`` alternating reference / mode calls."""
    first = worker.call()
    mine, theirs = [], []
    for _ in range(rounds):
        theirs.append(ref.call())
        mine.append(worker.call())
    return first, mine, theirs


def stats(calls: list[dict], key: str) -> tuple[float, float]:
    """``(best, median)`` of ``key`` over ``calls``."""
    values = sorted(c[key] for c in calls)
    return values[0], values[len(values) // 2]


def ratios(mine: list[dict], theirs: list[dict], key: str) -> dict:
    """Best-over-best and median-of-paired ratios of ``key`` (mode / reference)."""
    best = stats(mine, key)[0] / stats(theirs, key)[0]
    pairs = sorted(m[key] / t[key] for m, t in zip(mine, theirs))
    return {"best": round(best, 3), "paired_median": round(pairs[len(pairs) // 2], 3)}
