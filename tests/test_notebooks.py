"""Notebooks run top to bottom in smoke mode and are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cleansight_analysis.notebooks as nbmod
from cleansight_analysis.notebooks import RUN_SECONDS, expected_seconds, longest_first

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: Every paper figure / table notebook and the figure files (stems; PNG + PDF) it must write.
FIGURE_NOTEBOOKS = {
    "01_pixel_vs_attention_perturbation": ["fig1_pixel_vs_attention"],
    "02_attention_stealing": ["fig2_attention_stealing"],
    "03_layerwise_detection": ["fig3_layerwise_detection", "fig3_trigger_visibility"],
    "04_detection_layer_sweep": ["fig4_detection_layer_sweep"],
    "05_threshold_and_validation_size": ["fig5_threshold_and_validation_size"],
    "06_pruning_threshold": ["fig6_pruning_threshold"],
    "07_logit_lens": ["fig7_logit_lens"],
    "08_defense_tables": ["table1_attack_defense", "table3_module_ablation", "table4_adapter_lora"],
    "09_per_head_ablation": ["fig9_per_head_ablation"],
}
#: Names every figure notebook's parameters cell must set (papermill overrides them).
PARAMETERS = ("model", "attacks", "n_samples", "seed", "device", "data", "results_dir", "figures_dir", "smoke",
              "recompute")


def _parameters_cell(nb):
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("stem", sorted(FIGURE_NOTEBOOKS))
def test_every_figure_has_a_notebook_with_the_standard_parameters(stem):
    import ast

    path = ROOT / "notebooks" / f"{stem}.ipynb"
    assert path.is_file(), f"missing notebook {path.name}"
    tree = ast.parse(_parameters_cell(json.loads(path.read_text())))
    names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    assert set(PARAMETERS) <= names, f"{path.name} parameters cell lacks {sorted(set(PARAMETERS) - names)}"
    assert all(isinstance(node, ast.Assign) for node in tree.body), "parameters cell: plain assignments only"


@pytest.mark.parametrize("stem", sorted(FIGURE_NOTEBOOKS))
def test_committed_gallery_has_every_figure(stem):
    for fig in FIGURE_NOTEBOOKS[stem]:
        for ext in ("png", "pdf"):
            assert (ROOT / "figures" / f"{fig}.{ext}").stat().st_size > 5_000, f"{fig}.{ext} missing or empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs_and_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"
    _parameters_cell(nb)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.notebooks
def test_smoke_run_writes_figures(tmp_path):
    from cleansight_analysis.notebooks import run_notebooks

    figures = tmp_path / "figures"
    records = run_notebooks(ROOT / "notebooks", tmp_path / "executed", smoke=True, figures_dir=figures, jobs=2)
    assert [r["notebook"] for r in records] == [p.name for p in NOTEBOOKS]
    assert (figures / "quickstart_image_attention.png").stat().st_size > 10_000
    assert (figures / "quickstart_image_attention.pdf").is_file()
    for stem, names in FIGURE_NOTEBOOKS.items():
        for name in names:
            assert (figures / f"{name}.png").stat().st_size > 10_000, f"{stem} did not write {name}.png"
            assert (figures / f"{name}.pdf").is_file(), f"{stem} did not write {name}.pdf"
        assert any((tmp_path / "results-smoke" / stem).glob("*.manifest.json")), f"{stem} cached no table"
    results = tmp_path / "results-smoke" / "00_quickstart"
    assert (results / "group_mass.csv").is_file() and (results / "manifest.json").is_file()


def test_expected_seconds_reads_the_manifests_then_the_recorded_run(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    assert expected_seconds(results) == 0.0  # nothing known
    assert expected_seconds(results, 12.5) == 12.5  # the last full recompute's record (notebooks/run_seconds.json)
    (results / "a.manifest.json").write_text(json.dumps({"seconds": 30.0}))
    (results / "b.manifest.json").write_text(json.dumps({"seconds": 4.5}))
    (results / "broken.manifest.json").write_text("{not json")
    (results / "table.csv").write_text("seconds\n999\n")  # only manifests count
    assert expected_seconds(results, 12.5) == 34.5


def test_the_recorded_run_covers_every_notebook():
    recorded = json.loads((ROOT / "notebooks" / RUN_SECONDS).read_text())
    assert sorted(recorded) == [p.stem for p in NOTEBOOKS] and all(v >= 0 for v in recorded.values())


def test_longest_first_starts_the_longest_and_keeps_ties_in_order():
    assert longest_first(["a", "b", "c", "d"], [5.0, 0.0, 60.0, 0.0]) == ["c", "a", "b", "d"]
    assert longest_first(["a", "b"], [0.0, 0.0]) == ["a", "b"]  # nothing known: file order


def test_a_full_recompute_records_its_seconds_and_the_next_run_starts_longest_first(tmp_path, monkeypatch):
    """The scheduler alone (a stand-in executor, no kernels): a full recompute of the default results writes
    run_seconds.json; the next run, with no manifests left, starts the notebook that took longest."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for name in ("a_short", "b_long", "c_mid"):
        (nb_dir / f"{name}.ipynb").write_text((ROOT / "notebooks" / "00_quickstart.ipynb").read_text())
    took = {"a_short.ipynb": 1.0, "b_long.ipynb": 30.0, "c_mid.ipynb": 7.4}
    started = []

    def fake_execute(path, out, parameters, cwd):
        started.append(Path(path).name)
        return {"notebook": Path(path).name, "seconds": took[Path(path).name], "output": out}

    monkeypatch.setattr(nbmod, "_execute", fake_execute)
    records = nbmod.run_notebooks(nb_dir, tmp_path / "out", recompute=True, log=lambda *a: None)
    assert [r["notebook"] for r in records] == ["a_short.ipynb", "b_long.ipynb", "c_mid.ipynb"]
    assert json.loads((nb_dir / RUN_SECONDS).read_text()) == {"a_short": 1, "b_long": 30, "c_mid": 7}
    costs = [expected_seconds(tmp_path / "data" / "results" / s, nbmod._recorded_seconds(nb_dir).get(s))
             for s in ("a_short", "b_long", "c_mid")]
    assert longest_first(["a_short", "b_long", "c_mid"], costs) == ["b_long", "c_mid", "a_short"]
    # smoke runs, partial runs and cached runs leave the record alone
    (nb_dir / RUN_SECONDS).write_text("{}")
    nbmod.run_notebooks(nb_dir, tmp_path / "out", smoke=True, recompute=True, log=lambda *a: None)
    nbmod.run_notebooks(nb_dir, tmp_path / "out", only=["b_long"], recompute=True, log=lambda *a: None)
    nbmod.run_notebooks(nb_dir, tmp_path / "out", log=lambda *a: None)
    assert (nb_dir / RUN_SECONDS).read_text() == "{}"
