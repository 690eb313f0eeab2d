"""Cached tables are keyed by the code and the model files that computed them, not only by parameters.

A table is recomputed (with one line saying why) when the package source or an attack's model folder
changed since it was written; ``CLEANSIGHT_CACHE_IGNORE_CODE=1`` reuses it whatever the code.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cleansight_analysis import manifest as provenance
from cleansight_analysis.experiments.context import IGNORE_CODE_ENV, FigureContext
from cleansight_analysis.manifest import CODE_EXCLUDE, code_fingerprint, model_files_fingerprint

PACKAGE = Path(provenance.__file__).resolve().parent


class _Run:
    def __init__(self, tmp_path: Path, **ctx):
        self.logs: list[str] = []
        self.calls = 0
        self.ctx = FigureContext(results_dir=tmp_path, log=self.logs.append, **ctx)

    def compute(self) -> pd.DataFrame:
        self.calls += 1
        return pd.DataFrame({"x": [self.calls]})

    def get(self) -> pd.DataFrame:
        return self.ctx.cached("stealing", self.compute, n=3)


def test_the_manifest_stores_both_fingerprints(tmp_path):
    run = _Run(tmp_path)
    run.get()
    manifest = json.loads((tmp_path / "stealing.manifest.json").read_text())
    assert manifest["code_fingerprint"] == code_fingerprint()
    assert manifest["model_fingerprint"] == run.ctx.model_fingerprints()
    assert set(manifest["model_fingerprint"]) == {"badnet"} and manifest["model_fingerprint"]["badnet"]


def test_same_code_reuses_other_code_recomputes_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(IGNORE_CODE_ENV, raising=False)
    run = _Run(tmp_path)
    run.get()
    assert run.get().x.tolist() == [1] and run.calls == 1 and "reusing cached" in run.logs[-1]

    old = code_fingerprint()
    monkeypatch.setattr(provenance, "code_fingerprint", lambda *a, **k: "sha256:" + "d" * 64)
    table = run.get()
    assert run.calls == 2 and table.x.tolist() == [2]
    reason, computed = run.logs[-2:]
    assert reason == (f"stealing: cached table was computed by other code (package fingerprint {old[7:19]} != "
                      f"dddddddddddd; {IGNORE_CODE_ENV}=1 reuses it); recomputing")
    assert "\n" not in reason and computed.startswith("stealing: computed in")
    assert run.get().x.tolist() == [2] and run.calls == 2      # the new table carries the new fingerprint


def test_ignore_code_env_reuses_a_table_of_other_code(tmp_path, monkeypatch):
    run = _Run(tmp_path)
    run.get()
    monkeypatch.setattr(provenance, "code_fingerprint", lambda *a, **k: "sha256:" + "e" * 64)
    monkeypatch.setenv(IGNORE_CODE_ENV, "1")
    assert run.get().x.tolist() == [1] and run.calls == 1
    assert "reusing cached" in run.logs[-1] and f"{IGNORE_CODE_ENV}=1" in run.logs[-1]
    monkeypatch.setenv(IGNORE_CODE_ENV, "0")                   # "0" means off
    run.get()
    assert run.calls == 2


def test_a_manifest_without_fingerprints_is_recomputed(tmp_path):
    run = _Run(tmp_path)
    run.get()
    path = tmp_path / "stealing.manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["code_fingerprint"]
    path.write_text(json.dumps(manifest))
    run.get()
    assert run.calls == 2 and "package fingerprint none recorded != " in run.logs[-2]


def _fake_model(folder: Path, card: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps(card))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))


def test_changed_model_files_recompute(tmp_path):
    family = tmp_path / "fam"
    _fake_model(family / "badnet", {"name": "fake-badnet", "attack": {"name": "badnet"}})
    run = _Run(tmp_path / "results", model=str(family))
    run.get()
    assert run.get().x.tolist() == [1] and run.calls == 1
    (family / "badnet" / "card.json").write_text(json.dumps({"name": "fake-badnet", "attack": {"name": "badnet"},
                                                             "seed": 1}))
    run.get()
    assert run.calls == 2
    assert re.fullmatch(r"stealing: cached table was computed from other model files \(badnet: [0-9a-f]{12} != "
                        r"[0-9a-f]{12}\); recomputing", run.logs[-2]), run.logs[-2]


def test_a_delta_model_counts_its_base(tmp_path):
    family = tmp_path / "fam"
    _fake_model(family / "clean", {"name": "fake-clean"})
    (family / "clean" / "config.json").write_text("{}")
    _fake_model(family / "badnet", {"name": "fake-badnet", "attack": {"name": "badnet"}, "base": "../clean"})
    ctx = FigureContext(model=str(family), results_dir=tmp_path / "r", log=lambda m: None)
    before = ctx.model_fingerprints()["badnet"]
    (family / "clean" / "config.json").write_text('{"changed": 1}')
    assert ctx.model_fingerprints()["badnet"] != before


def _fake_package(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "plotting").mkdir()
    (pkg / "assets").mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "sub" / "mod.py").write_text("def f():\n    return 2\n")
    (pkg / "plotting" / "fig.py").write_text("COLOR = 'red'\n")
    (pkg / "assets" / "blend.png").write_bytes(b"\x89PNG fake")
    return pkg


def test_code_fingerprint_is_stable_and_follows_the_source(tmp_path):
    pkg = _fake_package(tmp_path)
    first = code_fingerprint(pkg)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first) and code_fingerprint(pkg) == first
    # the same source elsewhere, with CRLF line endings and byte-code caches: the same fingerprint
    copy = tmp_path / "elsewhere" / "pkg"
    shutil.copytree(pkg, copy)
    (copy / "sub" / "mod.py").write_bytes(b"def f():\r\n    return 2\r\n")
    (copy / "sub" / "__pycache__").mkdir()
    (copy / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0junk")
    (copy / ".hidden.py").write_text("x = 1\n")
    (copy / "notes.txt").write_text("not source\n")
    assert code_fingerprint(copy) == first
    # plotting never computes a table: editing it keeps every cached table
    (copy / "plotting" / "fig.py").write_text("COLOR = 'blue'\n")
    assert code_fingerprint(copy) == first
    # any other source or package-data edit, a new module, a renamed module: another fingerprint
    (copy / "sub" / "mod.py").write_text("def f():\n    return 3\n")
    changed = code_fingerprint(copy)
    assert changed != first
    (copy / "sub" / "new.py").write_text("")
    assert code_fingerprint(copy) not in (first, changed)
    (copy / "sub" / "new.py").unlink()
    (copy / "sub" / "mod.py").rename(copy / "sub" / "other.py")
    assert code_fingerprint(copy) not in (first, changed)
    (pkg / "assets" / "blend.png").write_bytes(b"\x89PNG other")
    assert code_fingerprint(pkg) != first


def test_the_package_fingerprint_is_computed_once_per_process():
    assert code_fingerprint() == code_fingerprint() == code_fingerprint(PACKAGE)


def test_large_files_count_by_header_and_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "FULL_HASH_LIMIT", 1000)
    monkeypatch.setattr(provenance, "_EDGE", 100)
    folder = tmp_path / "m"
    folder.mkdir()
    header = b'{"w": {"dtype": "U8", "shape": [2000], "data_offsets": [0, 2000]}}'
    body = bytearray(len(header).to_bytes(8, "little") + header + bytes(2000))
    path = folder / "model.safetensors"
    path.write_bytes(bytes(body))
    first = model_files_fingerprint(folder)
    assert model_files_fingerprint(folder) == first
    body[1000] = 7                                      # the middle of a large file is not read
    path.write_bytes(bytes(body))
    provenance._cached_file_digest.cache_clear()        # same size: do not rely on the mtime's resolution
    assert model_files_fingerprint(folder) == first
    body[-1] = 7                                        # its last bytes are
    path.write_bytes(bytes(body))
    provenance._cached_file_digest.cache_clear()
    assert model_files_fingerprint(folder) != first


def _imports_unit(node: ast.AST, unit: str) -> bool:
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        return module.split(".")[0] == unit or f".{unit}" in f".{module}" or \
            (node.level > 0 and module == "" and any(a.name == unit for a in node.names))
    if isinstance(node, ast.Import):
        return any(f"cleansight_analysis.{unit}" in a.name for a in node.names)
    return False


@pytest.mark.parametrize("unit", ["plotting", "training"])
def test_nothing_that_computes_tables_imports_an_excluded_unit(unit):
    """The premise of leaving ``plotting`` and ``training`` out of the code fingerprint: table code never runs
    their code. The one exception is :meth:`FigureContext.save_figure`, which saves a figure, not a table."""
    assert unit in CODE_EXCLUDE
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in CODE_EXCLUDE:   # each other, cli/ and notebooks.py: tests/test_layers.py keeps them on top
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "save_figure" and rel.as_posix() == \
                    "experiments/context.py":
                allowed |= {id(n) for n in ast.walk(node)}
        offenders += [f"{rel}:{n.lineno}" for n in ast.walk(tree) if _imports_unit(n, unit) and id(n) not in allowed]
    assert offenders == [], f"modules outside {unit}/ import it (include {unit} in the fingerprint?): {offenders}"


@pytest.mark.parametrize("value", ["", "0"])
def test_ignore_code_env_off_values(tmp_path, monkeypatch, value):
    monkeypatch.setenv(IGNORE_CODE_ENV, value)
    run = _Run(tmp_path)
    run.get()
    monkeypatch.setattr(provenance, "code_fingerprint", lambda *a, **k: "sha256:" + "f" * 64)
    run.get()
    assert run.calls == 2
