"""Project files agree with each other: pyproject vs environment.yml, pins, README contract, CI."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2).replace(" ", "")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"]}
    for extra in ("notebooks", "dev"):
        wanted |= {_norm(r) for r in project["optional-dependencies"][extra]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_pins_torch_and_never_torchvision():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = dict(_norm(r) for r in project["dependencies"])
    assert deps["torch"] == "==2.13.0"
    assert deps["transformer-lens"] == ">=4.3,<4.4" and deps["transformers"] == ">=5.9,<5.40"
    constraints = (ROOT / "constraints.txt").read_text().lower()
    assert re.search(r"^torch==2\.13\.0$", constraints, re.M)
    assert "torchvision" not in constraints and "+cpu" not in constraints
    assert "cleansight = \"cleansight_analysis.cli:main\"" in (ROOT / "pyproject.toml").read_text()


def test_readme_and_ci_contract():
    readme = (ROOT / "README.md").read_text()
    assert "make figures" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "OMP_NUM_THREADS=1" in ci and "HF_HUB_OFFLINE=1" in ci
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup:", "test: setup", "figures: setup", "figures-smoke: setup"):
        assert target in makefile


def test_cli_entry_point_runs():
    from cleansight_analysis.cli import main

    assert main(["models", "list"]) == 0
    assert main(["inspect", "--image", "/definitely/not/here.png"]) == 2


def test_readme_quick_start_runs():
    """The README's quick-start block is executed as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["rows"].values.shape[1:3] == (4, 4)
    assert namespace["mass"].shape[-1] == 4
    assert namespace["heat"].shape == (8, 8)
    assert len(namespace["out"].texts) == 1
