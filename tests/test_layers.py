"""The package is layered: every import runs downward (issue 12, item 6).

Every module of ``cleansight_analysis`` is parsed with :mod:`ast`; every import (module level, inside
functions, under ``if TYPE_CHECKING``, relative or absolute) that names a module of the package is
mapped to the *unit* it lands in (the first component under ``cleansight_analysis``: ``models``,
``attention``, ...; ``from cleansight_analysis import manifest`` lands in ``manifest``, ``from .. import
load_lvlm`` in the package facade). An import may only go to a unit of a LOWER rank, or stay inside its
own unit. Units of equal rank are siblings and must not import each other.

Layer map, bottom to top (rank: units):

- **L0 utilities** -- 0.0 ``errors``; 0.1 ``_runtime``, ``registry`` (the one :class:`Registry`
  pattern), ``settings`` (the one validated-settings pattern, on pydantic); 0.2 ``manifest``; 0.3 ``results`` (writes tables with a manifest).
- **L1 inputs and data** -- 1.0 ``data`` (the ``Sample`` type, datasets, the synthetic world) and
  ``inputs`` (images, templates, conversations, batches, token groups): independent siblings;
  1.1 ``attacks`` (poisons ``Sample``s and images: imports both).
- **L2 model core** -- 2.0 ``models`` (loading, ``HookedLVLM``, registry, tiny models, fingerprint, the
  attention-rows core ``models.rows``, hook names ``models.hooknames`` and the ``Intervention``
  interface ``models.intervention``, which both the analyses and the interventions take);
  2.1 ``detection`` (the detector core: features, whitening, threshold, pruning set, key masks, passes).
  The code puts ``detection`` here, not above ``attention`` as first planned: it reads rows through the
  model core only, and the attention analyses (``attention.stealing``, ``attention.separability``) compute
  their stealing features and whitened distances WITH it (one definition of each), so analyses sit above.
- **L3 analyses and edits** -- 3.0 ``attention`` (analyses of rows) and ``interventions`` (hook-based
  edits, the logit lens): siblings that must not import each other.
- **L4** -- 4.0 ``defenses`` (CleanSight and baselines: detection, attention, interventions).
- **L5** -- 5.0 ``evaluation`` (scoring, runners, sweeps, grids).
- **L6** -- 6.0 ``training`` and ``experiments``: siblings. ``training`` sits above ``evaluation``
  because ``training/family.py`` evaluates each trained backdoor (``evaluate_backdoor``) for its card;
  ``evaluation`` must not import ``training`` (the tiny world it samples from is ``data.synthetic``).
- **L7** -- 7.0 ``plotting`` (draws the tables of ``experiments``; reads a few of their constants).
- **L8 entry points** -- 8.0 the package facade (``cleansight_analysis/__init__.py``) and
  ``notebooks``; 8.1 ``cli`` (may import the facade and ``notebooks``).

A second check: an import inside a function is allowed only when it is lazy on purpose, and says so in
a comment on its line or the line above. Third-party modules that are heavy and that
``import cleansight_analysis`` does not otherwise load (:data:`LAZY_MODULES`, each with its reason) may be
imported inside functions without a comment. Avoiding an import cycle is not a reason: a cycle means a
layer is wrong.

Transitional lists (the lead clears them; a stale entry fails too, so each is removed once fixed):
:data:`KNOWN` (layer violations) and :data:`UNCOMMENTED` (files with uncommented function-level
imports), both only in files other workers own.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "cleansight_analysis"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
FACADE = "<facade>"

#: unit -> rank (see the module docstring). Equal ranks are siblings.
RANKS: dict[str, float] = {
    "errors": 0.0, "_runtime": 0.1, "registry": 0.1, "settings": 0.1, "manifest": 0.2, "results": 0.3,
    "distributed": 0.3,
    "data": 1.0, "inputs": 1.0, "attacks": 1.1,
    "models": 2.0, "detection": 2.1,
    "attention": 3.0, "interventions": 3.0,
    "defenses": 4.0,
    "evaluation": 5.0,
    "training": 6.0, "experiments": 6.0,
    "plotting": 7.0,
    FACADE: 8.0, "notebooks": 8.0, "cli": 8.1,
}

#: Third-party modules that may be imported inside a function without a comment: heavy, and not
#: loaded by ``import cleansight_analysis`` (which stays ~1.5 s: torch, numpy, PIL, tqdm).
LAZY_MODULES: dict[str, str] = {
    "pandas": "tables only; ~0.3 s",
    "matplotlib": "plotting only; ~0.3 s, and picks a GUI backend on import",
    "seaborn": "plotting only; imports matplotlib, pandas and scipy",
    "sklearn": "AUROC / Ledoit-Wolf only; ~0.5 s",
    "scipy": "statistics only; ~0.3 s",
    "transformers": "model loading only; several seconds",
    "transformer_lens": "model loading only (the bridge); imports transformers",
    "peft": "LoRA training / loading only; imports transformers",
    "tokenizers": "tiny-model tokenizer only",
    "safetensors": "weight files only",
    "pyarrow": "parquet tables only",
    "papermill": "running notebooks only",
    "pycocoevalcap": "CIDEr only",
    "rich": "CLI tables only",
}

# Accepted exceptions, each with its reason: (file, imported module) -> why. None today; an entry must be
# removed once its import is gone (the tests below fail on stale entries).
KNOWN: dict[tuple[str, str], str] = {}

# Files allowed function-level imports without a comment: file -> why. None today.
UNCOMMENTED: dict[str, str] = {}


def _modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((path, ".".join(parts)))
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    base = ROOT.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return FACADE if len(parts) == 1 else parts[1]


def _package_of(path: Path, module: str) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


class _Imports(ast.NodeVisitor):
    """Every import of the package's modules: ``(lineno, target module, in_function, node)``."""

    def __init__(self, path: Path, module: str):
        self.package = _package_of(path, module)
        self.depth = 0
        self.found: list[tuple[int, str, bool, ast.AST]] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self.found.append((node.lineno, alias.name, self.depth > 0, node))
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            for alias in node.names:  # ``from pkg import submodule`` lands in the submodule's unit
                sub = f"{target}.{alias.name}"
                self.found.append((node.lineno, sub if _is_module(sub) else target, self.depth > 0, node))
        self.generic_visit(node)


def _package_imports():
    for path, module in _modules():
        visitor = _Imports(path, module)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for lineno, target, in_function, node in visitor.found:
            yield path, module, lineno, target, in_function, node


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_unit_has_a_rank():
    units = {_unit(module) for _, module in _modules()}
    assert units <= set(RANKS), f"units without a layer: {sorted(units - set(RANKS))}; add them to RANKS"


def _violations() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path, module, lineno, target, _, _ in _package_imports():
        src, dst = _unit(module), _unit(target)
        if src == dst:
            continue
        if RANKS[dst] > RANKS[src]:
            why = f"imports {target} (layer {RANKS[dst]} {dst}) from layer {RANKS[src]} {src}"
        elif RANKS[dst] == RANKS[src]:
            why = f"imports {target}: {src} and {dst} are siblings (layer {RANKS[src]})"
        else:
            continue
        found.setdefault((_rel(path), target), []).append(f"{PACKAGE}/{_rel(path)}:{lineno} {why}")
    return found


def test_imports_only_run_downward():
    found = _violations()
    new = [msg for key, msgs in sorted(found.items()) if key not in KNOWN for msg in msgs]
    assert not new, "imports from a higher layer or between siblings:\n" + "\n".join(new)


def test_known_violations_are_still_present():
    stale = sorted(set(KNOWN) - set(_violations()))
    assert not stale, f"fixed, remove from KNOWN: {stale}"


def _function_imports():
    """Every import inside a function body, of any module: ``(path, lineno, top-level module name)``."""
    for path, module in _modules():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = ["." if inner.level else (inner.module or "")]
                else:
                    continue
                commented = "#" in lines[inner.lineno - 1] or lines[inner.lineno - 2].strip().startswith("#")
                for name in names:
                    yield path, inner.lineno, name.split(".")[0], commented


def test_function_level_imports_say_why():
    bad = sorted({f"{PACKAGE}/{_rel(path)}:{lineno} imports {top} inside a function without a comment saying why"
                  for path, lineno, top, commented in _function_imports()
                  if not commented and top not in LAZY_MODULES and _rel(path) not in UNCOMMENTED})
    assert not bad, ("move these imports to the module top (a cycle means a layer is wrong), or say why they "
                     "are lazy in a comment:\n" + "\n".join(bad))


def test_uncommented_files_still_need_it():
    still = {_rel(path) for path, _, top, commented in _function_imports() if not commented and top not in LAZY_MODULES}
    stale = sorted(set(UNCOMMENTED) - still)
    assert not stale, f"every function-level import of these files is fine now, remove from UNCOMMENTED: {stale}"


@pytest.mark.parametrize("module", ["pandas", "matplotlib", "sklearn"])
def test_lazy_modules_stay_out_of_the_package_import(module):
    """What ``LAZY_MODULES`` promises: importing the package does not load them."""
    code = f"import sys, cleansight_analysis; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
