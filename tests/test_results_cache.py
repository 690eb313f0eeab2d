"""The results cache cannot be poisoned: a table is reused only when its manifest vouches for its bytes.

Every damaged state (missing / truncated / empty / edited table, missing / truncated manifest, a stale table
from another run, a writer killed between table and manifest) is reported in one log line and recomputed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from cleansight_analysis.errors import InputError
from cleansight_analysis.experiments.context import FigureContext
from cleansight_analysis.manifest import build_manifest, portable, repo_root
from cleansight_analysis.results import load_manifest, load_table, save_table, verify_table

REPO = Path(__file__).resolve().parents[1]


class _Run:
    """A FigureContext on ``tmp_path`` whose ``compute`` returns ``n`` rows tagged with the call number."""

    def __init__(self, tmp_path: Path, n: int = 8):
        self.logs: list[str] = []
        self.calls = 0
        self.n = n
        self.dir = tmp_path
        self.ctx = FigureContext(results_dir=tmp_path, n_samples=n, log=self.logs.append)

    def compute(self) -> pd.DataFrame:
        self.calls += 1
        return pd.DataFrame({"i": list(range(self.n)), "value": [100 * self.calls + i for i in range(self.n)]})

    def get(self) -> pd.DataFrame:
        return self.ctx.cached("t", self.compute, kind="st")

    @property
    def table(self) -> Path:
        return self.dir / "t.parquet"

    @property
    def manifest(self) -> Path:
        return self.dir / "t.manifest.json"


def _recomputed(run: _Run, table: pd.DataFrame, pattern: str) -> None:
    """``table`` is the second computation and the reuse attempt said why in exactly one line."""
    assert run.calls == 2
    assert table["value"].tolist() == [200 + i for i in range(run.n)]
    reason, computed = run.logs[-2:]
    assert re.search(pattern, reason), reason
    assert reason.startswith("t: cached ") and reason.endswith("; recomputing") and "\n" not in reason
    assert "Traceback" not in reason and computed.startswith("t: computed in")
    assert verify_table(run.table) is None            # the recomputed pair is valid again


@pytest.fixture
def run(tmp_path):
    r = _Run(tmp_path)
    first = r.get()
    assert r.calls == 1 and first["value"].tolist() == [100 + i for i in range(8)]
    return r


def test_happy_path_reuses_and_says_so(run):
    again = run.get()
    assert run.calls == 1 and again["value"].tolist() == [100 + i for i in range(8)]
    assert run.logs[-1].startswith(f"t: reusing cached results {run.table}")
    manifest = json.loads(run.manifest.read_text())
    assert manifest["rows"] == 8 and len(manifest["table_sha256"]) == 64


def test_table_without_manifest_is_recomputed(run):
    run.manifest.unlink()
    _recomputed(run, run.get(), rf"table {re.escape(str(run.table))} has no manifest")


def test_manifest_without_table_is_recomputed(run):
    run.table.unlink()
    _recomputed(run, run.get(), r"table .*t\.parquet is missing \(its manifest .* is there\)")


def test_truncated_table_is_recomputed(run):
    data = run.table.read_bytes()
    run.table.write_bytes(data[: len(data) // 2])
    _recomputed(run, run.get(), r"does not match its manifest \(sha256 differs\)")


def test_empty_table_is_recomputed(run):
    run.table.write_bytes(b"")
    _recomputed(run, run.get(), r"table .*t\.parquet is empty \(0 bytes\)")


def test_truncated_manifest_is_recomputed(run):
    text = run.manifest.read_text()
    run.manifest.write_text(text[: len(text) // 2])
    _recomputed(run, run.get(), r"manifest .*t\.manifest\.json is not valid JSON, maybe truncated")


def test_edited_value_is_detected_by_the_hash(run):
    table = pd.read_parquet(run.table)
    table.loc[3, "value"] = -1                          # same rows, same columns, one number changed
    table.to_parquet(run.table, index=False)
    _recomputed(run, run.get(), r"does not match its manifest \(sha256 differs\)")


def test_stale_table_from_another_run_is_not_used(run):
    # A run with n=16 replaced the table and was killed before its manifest: the n=8 manifest remains.
    pd.DataFrame({"i": range(16), "value": range(16)}).to_parquet(run.table, index=False)
    _recomputed(run, run.get(), r"does not match its manifest \(sha256 differs\)")


def test_stale_table_whose_manifest_was_lost_is_not_used(run):
    pd.DataFrame({"i": range(16), "value": range(16)}).to_parquet(run.table, index=False)
    run.manifest.unlink()
    _recomputed(run, run.get(), r"has no manifest")


def test_writer_killed_between_table_and_manifest_leaves_nothing_usable(run, monkeypatch):
    import cleansight_analysis.results as results

    real = results.os.replace

    def killed(src, dst):
        if str(dst).endswith(".manifest.json"):
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(results.os, "replace", killed)
    big = pd.DataFrame({"i": range(16), "value": range(16)})
    with pytest.raises(KeyboardInterrupt):
        save_table(big, run.dir, "t", params=run.ctx.settings())
    monkeypatch.setattr(results.os, "replace", real)
    assert len(pd.read_parquet(run.table)) == 16 and verify_table(run.table) is not None
    assert not list(run.dir.glob(".t.*.tmp"))          # the staging folder is gone
    _recomputed(run, run.get(), r"has no manifest")


def test_other_parameters_still_recompute(run):
    run.ctx.n_samples = 9
    run.get()
    assert run.calls == 2 and "other parameters" in run.logs[-2]


def test_load_functions_name_the_damaged_file(tmp_path):
    path = save_table(pd.DataFrame({"a": [1, 2, 3]}), tmp_path, "x")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"x\.parquet is unreadable"):
        load_table(path)
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"x\.parquet is empty"):
        load_table(path)
    manifest = tmp_path / "x.manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(InputError, match=r"x\.manifest\.json is not valid JSON"):
        load_manifest(path)
    manifest.write_text("[1, 2]")
    with pytest.raises(InputError, match=r"x\.manifest\.json holds a JSON list"):
        load_manifest(path)
    assert verify_table(tmp_path / "missing.parquet") == f"table {tmp_path / 'missing.parquet'} is missing"


def test_manifest_without_hash_is_not_trusted(run):
    manifest = json.loads(run.manifest.read_text())
    del manifest["table_sha256"]
    run.manifest.write_text(json.dumps(manifest))
    _recomputed(run, run.get(), r"has no table_sha256")


# ------------------------------------------------------------------ paths


def test_repository_paths_are_stored_relative():
    root = repo_root()
    assert root == REPO
    manifest = build_manifest(settings={"out": str(REPO / "benchmarks" / "results" / "x.json"),
                                        "data": f"vqav2:{REPO / 'data' / 'vqav2'}", "other": "/elsewhere/x"})
    assert manifest["settings"] == {"out": "benchmarks/results/x.json", "data": "vqav2:data/vqav2",
                                    "other": "/elsewhere/x"}
    assert portable([str(REPO), ("a", str(REPO / "b"))]) == [".", ["a", "b"]]


def test_a_model_folder_inside_the_repo_gives_a_portable_cache_key(tmp_path):
    folder = str(REPO / "data" / "models" / "tiny-llava")
    logs: list[str] = []
    ctx = FigureContext(model=folder, results_dir=tmp_path, log=logs.append)
    ctx.cached("t", lambda: pd.DataFrame({"x": [1]}))
    assert json.loads((tmp_path / "t.manifest.json").read_text())["params"]["model"] == "data/models/tiny-llava"
    ctx.cached("t", lambda: pd.DataFrame({"x": [2]}))
    assert "reusing cached" in logs[-1]


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


_ABSOLUTE = re.compile(r"(^|:)/[\w.~-]+/")        # "/home/x/...", "vqav2:/data/..."; not "tiny-llava/badnet"


def _shipped_json() -> list[Path]:
    files = sorted((REPO / "data" / "results").rglob("*.manifest.json"))
    files += sorted((REPO / "benchmarks" / "results").glob("*.json"))
    assert len(files) > 30
    return files


@pytest.mark.parametrize("path", _shipped_json(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_result_files_hold_no_absolute_paths(path):
    text = path.read_text()
    assert str(REPO) not in text
    bad = [s for s in _strings(json.loads(text)) if _ABSOLUTE.search(s)]
    assert not bad, f"{path.relative_to(REPO)} holds absolute paths: {bad}"


def test_every_shipped_table_matches_its_manifest():
    manifests = sorted((REPO / "data" / "results").rglob("*.manifest.json"))
    bad = {}
    for manifest in manifests:
        table = manifest.with_name(json.loads(manifest.read_text())["table"])
        reason = verify_table(table)
        if reason is not None:
            bad[str(table.relative_to(REPO))] = reason
    assert not bad, bad
