"""FigureContext: parameter validation, model resolution and result caching used by every figure notebook."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cleansight_analysis.errors import InputError
from cleansight_analysis.experiments import SMOKE_SAMPLES, FigureContext


def test_bad_parameters_are_named():
    with pytest.raises(InputError, match="n_samples"):
        FigureContext(n_samples=0)
    with pytest.raises(InputError, match="attacks"):
        FigureContext(attacks=[])
    with pytest.raises(InputError, match="device"):
        FigureContext(device="tpu")
    with pytest.raises(InputError, match="data"):
        FigureContext(data="/no/dataset/name")


def test_counts_and_model_specs(tmp_path):
    ctx = FigureContext(attacks="badnet", n_samples=100, smoke=True, results_dir=tmp_path)
    assert ctx.attacks == ["badnet"]
    assert ctx.count() == SMOKE_SAMPLES and ctx.count(3) == 3
    assert FigureContext(n_samples=100).count() == 100
    assert ctx.model_spec("badnet") == "tiny-llava/badnet"
    with pytest.raises(InputError, match="no model for attack 'nope'"):
        ctx.model_spec("nope")
    # a single backdoored model: its card names the attack, another attack is refused
    one = FigureContext(model="tiny-llava/blended", attacks=["blended"])
    assert one.model_spec("blended") == "tiny-llava/blended"
    with pytest.raises(InputError, match="backdoored with 'blended'"):
        one.model_spec("badnet")
    # a folder with one sub-folder per attack
    (tmp_path / "fam" / "sig").mkdir(parents=True)
    assert FigureContext(model=str(tmp_path / "fam")).model_spec("sig") == str(tmp_path / "fam" / "sig")
    # one model to show (quick start): the model itself when loadable, else the first attack's member
    assert FigureContext(model="tiny-llava/blended").single_model_spec() == "tiny-llava/blended"
    assert FigureContext(model="tiny-llava", attacks=["sig", "badnet"]).single_model_spec() == "tiny-llava/sig"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    assert FigureContext(model=str(tmp_path / "plain")).single_model_spec() == str(tmp_path / "plain")


def test_cache_reuses_same_parameters_and_recomputes_otherwise(tmp_path):
    logs = []
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [len(calls)]})

    ctx = FigureContext(results_dir=tmp_path, log=logs.append)
    first = ctx.cached("t", compute, kinds=("st", "jpeg"))
    again = ctx.cached("t", compute, kinds=["st", "jpeg"])      # tuple vs list: same JSON
    assert len(calls) == 1 and again.equals(first)
    assert "reusing cached" in logs[-1]
    manifest = json.loads((tmp_path / "t.manifest.json").read_text())
    assert manifest["params"]["kinds"] == ["st", "jpeg"] and manifest["params"]["model"] == "tiny-llava"
    changed = ctx.cached("t", compute, kinds=["st"])
    assert len(calls) == 2 and int(changed.x[0]) == 2 and "other parameters" in logs[-2]
    FigureContext(results_dir=tmp_path, recompute=True, log=logs.append).cached("t", compute, kinds=["st"])
    assert len(calls) == 3
    FigureContext(results_dir=tmp_path, n_samples=7, log=logs.append).cached("t", compute, kinds=["st"])
    assert len(calls) == 4          # a notebook-level parameter is part of the key


def test_samples_are_deterministic():
    ctx = FigureContext(n_samples=5, seed=3)
    a, b = ctx.samples("test"), ctx.samples("test")
    assert len(a) == 5 and [s.prompt for s in a] == [s.prompt for s in b]


def test_shared_tables_are_computed_once_for_every_notebook(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [1, 2]})

    a = FigureContext(results_dir=tmp_path / "03_a", log=lambda m: None)
    b = FigureContext(results_dir=tmp_path / "04_b", log=lambda m: None)
    a.cached("rows", compute, shared=True, n_val=5)
    assert b.cached("rows", compute, shared=True, n_val=5)["x"].tolist() == [1, 2] and calls == [1]
    assert (tmp_path / "shared" / "rows.manifest.json").is_file() and not (tmp_path / "04_b").exists()
    b.cached("rows", compute, shared=True, n_val=6)                    # other parameters: computed again
    assert calls == [1, 1]


def test_a_shared_table_of_one_attack_ignores_the_notebooks_other_attacks(tmp_path, monkeypatch):
    """Notebook 03 runs six attacks and notebooks 04/05 three: their per-attack shared tables are one copy,
    keyed by that attack's model files only; a table of all attacks still depends on the list."""
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [len(calls)]})

    prints = {"badnet": "sha256:aa", "blended": "sha256:bb", "wanet": "sha256:cc"}
    monkeypatch.setattr(FigureContext, "model_fingerprints",
                        lambda self: {a: prints[a] for a in self.attacks})
    six = FigureContext(results_dir=tmp_path / "03_a", attacks=["badnet", "blended", "wanet"], log=lambda m: None)
    three = FigureContext(results_dir=tmp_path / "04_b", attacks=["badnet", "blended"], log=lambda m: None)
    six.cached("rows_badnet", compute, shared=True, attack="badnet", n_val=5)
    assert three.cached("rows_badnet", compute, shared=True, attack="badnet", n_val=5)["x"].tolist() == [1]
    assert calls == [1]
    three.cached("sweep", compute, shared=True, n_val=5)              # no attack: the attack list is part of the key
    six.cached("sweep", compute, shared=True, n_val=5)
    assert calls == [1, 1, 1]
    prints["badnet"] = "sha256:retrained"                              # that attack's model changed: computed again
    six.cached("rows_badnet", compute, shared=True, attack="badnet", n_val=5)
    assert calls == [1, 1, 1, 1]
    prints["wanet"] = "sha256:other"                                   # another attack's model: reused
    six.cached("rows_badnet", compute, shared=True, attack="badnet", n_val=5)
    assert calls == [1, 1, 1, 1]


def test_recompute_since_a_timestamp_redoes_only_older_tables(tmp_path):
    import time
    from datetime import datetime, timezone

    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [len(calls)]})

    FigureContext(results_dir=tmp_path / "a", log=lambda m: None).cached("t", compute, shared=True)
    time.sleep(1.1)
    start = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    first = FigureContext(results_dir=tmp_path / "a", recompute=start, log=lambda m: None)
    first.cached("t", compute, shared=True)                    # older than the run: recomputed
    second = FigureContext(results_dir=tmp_path / "b", recompute=start, log=lambda m: None)
    assert second.cached("t", compute, shared=True).x.tolist() == [2] and calls == [1, 1]   # made in this run
    with pytest.raises(InputError, match="ISO timestamp"):
        FigureContext(recompute="yesterday")


def _shared_worker(args):
    results_dir, marker = args
    import time as _time

    def compute():
        with open(marker, "a") as fh:
            fh.write("x")
        _time.sleep(0.5)
        return pd.DataFrame({"x": [1]})

    ctx = FigureContext(results_dir=results_dir, log=lambda m: None)
    return int(ctx.cached("rows", compute, shared=True, n_val=3).x[0])


def test_shared_table_is_computed_once_by_notebooks_running_at_the_same_time(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    marker = tmp_path / "computed"
    jobs = [(str(tmp_path / f"0{i}_nb"), str(marker)) for i in range(3)]
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(_shared_worker, jobs)) == [1, 1, 1]
    assert marker.read_text() == "x"
