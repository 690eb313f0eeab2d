"""Notebooks run top to bottom in smoke mode and are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs_and_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"
    tags = [t for c in nb["cells"] for t in c.get("metadata", {}).get("tags", [])]
    assert "parameters" in tags
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.notebooks
def test_smoke_run_writes_figures(tmp_path):
    from cleansight_analysis.notebooks import run_notebooks

    figures = tmp_path / "figures"
    records = run_notebooks(ROOT / "notebooks", tmp_path / "executed", smoke=True, figures_dir=figures)
    assert [r["notebook"] for r in records] == [p.name for p in NOTEBOOKS]
    assert (figures / "quickstart_image_attention.png").stat().st_size > 10_000
    assert (figures / "quickstart_image_attention.pdf").is_file()
    results = tmp_path / "results-smoke" / "00_quickstart"
    assert (results / "group_mass.csv").is_file() and (results / "manifest.json").is_file()
