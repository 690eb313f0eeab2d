"""benchmarks/gpu_check.py at ``--scale cpu-tiny`` on the CPU: the GPU check's code runs in every test run.

The full check (7B-shaped LLaVA-1.5 and LLaVA-NeXT in bfloat16) needs a CUDA device; this runs the same phases on
the tiny float32 shapes in a subprocess (its own seeds, its own transformers registrations), about 20 s here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PHASES = ("build", "reference", "rows_check", "generation_check", "calibrate", "timings", "stealing_table",
          "largest_batch")
TIMINGS = ("hf_sdpa_generate", "attention_rows", "bridged_generate", "cleansight_one_pass",
           "cleansight_one_pass_all_flagged", "cleansight_all_layers_all_flagged", "authors_style")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "x.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "cpu-tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_checks_ran_and_passed(result):
    data, _ = result
    assert data["checks_passed"] is True and data["missing_checks"] == [] and data["errors"] == []
    assert data["device"]["type"] == "cpu" and data["device"]["torch_threads"] == 1
    assert {"git_revision", "versions", "settings"} <= set(data["manifest"])
    assert data["manifest"]["settings"]["scale"] == "cpu-tiny"
    assert set(data["models"]) == {"llava-1.5-cpu-tiny", "llava-next-cpu-tiny"}
    assert len(data["checks"]) == 4 and all(data["checks"].values())
    for name, model in data["models"].items():
        phases = model["phases"]
        assert set(PHASES) <= set(phases), name
        assert all(phases[p]["ok"] for p in PHASES), name
        rows = phases["rows_check"]
        assert rows["passed"] and rows["within_tolerance"] and rows["max_abs_err"] <= 1e-5
        assert rows["controls_fail_tolerance"] == {"next_head": True, "keys_shifted": True}
        assert rows["premise_last_logits_max_abs_diff_vs_hf_sdpa"] == 0.0
        assert rows["entries"] > 0 and rows["score_span_within_derivation"]
        gen = phases["generation_check"]
        assert gen["passed"] and gen["identical"] and gen["tokens"] == gen["hf_tokens"]
    next_shape = data["models"]["llava-next-cpu-tiny"]["phases"]["build"]["shape"]
    assert next_shape["kv_heads"] < next_shape["heads"]  # grouped KV heads are what the NeXT check is for


def test_every_timing_is_a_positive_finite_number(result):
    data, _ = result
    for name, model in data["models"].items():
        timings = model["phases"]["timings"]["timings"]
        assert set(TIMINGS) <= set(timings), name
        for mode in TIMINGS:
            rec = timings[mode]
            for key in ("warmup_s", "best_s", "median_s", "best_cpu_s", "samples_per_s"):
                assert _positive(rec[key]), (name, mode, key, rec[key])
            assert rec["peak_extra_mib_per_sample"] >= 0 and math.isfinite(rec["peak_extra_mib_per_sample"])
        assert timings["cleansight_one_pass_all_flagged"]["flagged"] == timings["hf_sdpa_generate"]["batch"]
        assert timings["cleansight_all_layers_all_flagged"]["passes"] == 2
        ratios = model["phases"]["timings"]["ratio_to_hf_sdpa_generate"]
        assert all(_positive(v) for v in ratios.values()) and "authors_style" in ratios
        steal = model["phases"]["stealing_table"]
        assert _positive(steal["seconds"]) and _positive(steal["samples_per_s"]) and steal["table_rows"] > 0
        assert "CUDA only" in model["phases"]["largest_batch"]["skipped"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_refuses_to_overwrite_and_full_scale_on_cpu(result, capsys):
    _, out = result
    mod = _module()
    before = out.read_bytes()
    assert mod.main(["--scale", "cpu-tiny", "--device", "cpu", "--out", str(out)]) == 2
    assert out.read_bytes() == before
    assert mod.main(["--scale", "full", "--device", "cpu", "--out", str(out.with_name("y.json"))]) == 2
    assert not out.with_name("y.json").exists()
    err = capsys.readouterr().err
    assert "--overwrite" in err and "needs a CUDA device" in err


def test_doubling_search_stops_at_out_of_memory_the_cap_and_the_budget():
    import time

    mod = _module()

    class FakeOOM(RuntimeError):
        pass

    def probe(limit):
        def run(b):
            if b > limit:
                raise FakeOOM(f"CUDA out of memory at {b}")
            return {"batch": b}
        return run

    far = time.perf_counter() + 3600
    res = mod.doubling_search(probe(40), 8, 256, far, mod.is_oom)
    assert res["largest_fitting"] == 32 and res["stopped"].startswith("out of memory at batch 64")
    assert [t["batch"] for t in res["tried"]] == [8, 16, 32]
    assert mod.doubling_search(probe(10 ** 6), 8, 64, far, mod.is_oom) == {
        "largest_fitting": 64, "stopped": "cap 64", "tried": [{"batch": b} for b in (8, 16, 32, 64)]}
    assert mod.doubling_search(probe(10 ** 6), 8, 64, time.perf_counter() - 1, mod.is_oom)["largest_fitting"] == 0

    def broken(b):
        raise ValueError("a bug, not a full GPU")

    with pytest.raises(ValueError):
        mod.doubling_search(broken, 8, 64, far, mod.is_oom)
