"""Run the figure notebooks top to bottom with papermill (``make figures`` / ``cleansight figures``)."""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable


class NotebookFailed(RuntimeError):
    """A cell of a notebook raised: names the notebook, the cell, the error and the executed copy."""


#: kernel option that keeps ipykernel's log (warnings, shutdown notes) off the terminal
KERNEL_QUIET = "--IPKernelApp.log_level=CRITICAL"


def find_notebooks(notebook_dir: str | Path, only: Iterable[str] | None = None) -> list[Path]:
    """Notebooks in ``notebook_dir`` (sorted by name), optionally those whose name contains one of ``only``."""
    paths = sorted(p for p in Path(notebook_dir).glob("*.ipynb") if not p.name.startswith("."))
    if only:
        wanted = list(only)
        paths = [p for p in paths if any(w in p.stem for w in wanted)]
    return paths


#: Per notebook, the seconds its last full recompute of the embedded model took (written next to the notebooks by
#: ``run_notebooks(recompute=True)`` over all of them): the schedule's fallback when no table manifest is left.
RUN_SECONDS = "run_seconds.json"


def expected_seconds(results_dir: str | Path, recorded: float | None = None) -> float:
    """What one notebook last cost, for scheduling: the summed ``seconds`` of the table manifests in its
    ``results_dir`` (each cached table records how long it took to compute), else ``recorded`` (its entry in
    :data:`RUN_SECONDS`), else 0 (unknown). Unreadable manifests count as unknown."""
    total = 0.0
    for manifest in Path(results_dir).glob("*.manifest.json"):
        try:
            total += float(json.loads(manifest.read_text()).get("seconds") or 0.0)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return total if total > 0 else float(recorded or 0.0)


def _recorded_seconds(notebook_dir: Path) -> dict[str, float]:
    try:
        data = json.loads((notebook_dir / RUN_SECONDS).read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def longest_first(tasks: list[tuple], costs: list[float]) -> list[tuple]:
    """``tasks`` ordered by ``costs``, largest first (ties keep their order): with several workers the
    longest notebook starts at once instead of last, so the run ends closer to its longest notebook."""
    order = sorted(range(len(tasks)), key=lambda i: -costs[i])
    return [tasks[i] for i in order]


def _execute(path: str, out: str, parameters: dict[str, Any], cwd: str) -> dict[str, Any]:
    """Execute one notebook with papermill; a top-level function so worker processes can run it."""
    import papermill as pm

    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()
    # The kernel's own log (a TCP-transport warning at start, a KeyboardInterrupt note when papermill
    # stops it) is noise here; a failing cell still raises PapermillExecutionError with its traceback.
    try:
        pm.execute_notebook(path, out, parameters=parameters, kernel_name="python3", cwd=cwd, progress_bar=False,
                            log_output=False, extra_arguments=[KERNEL_QUIET])
    except PapermillExecutionError as exc:
        last = (exc.evalue or "").strip().splitlines()
        raise NotebookFailed(f"{Path(path).name} failed in cell {exc.exec_count}: {exc.ename}: "
                             f"{last[-1] if last else ''} (executed notebook with the traceback: {out})") from None
    return {"notebook": Path(path).name, "seconds": round(time.perf_counter() - start, 2), "output": out}


def run_notebooks(notebook_dir: str | Path = "notebooks", output_dir: str | Path = "build/notebooks", *,
                  smoke: bool = False, figures_dir: str | Path | None = None, results_dir: str | Path | None = None,
                  only: Iterable[str] | None = None, recompute: bool = False, jobs: int = 1,
                  parameters: dict[str, Any] | None = None, log: Any = print) -> list[dict[str, Any]]:
    """Execute notebooks with papermill; executed copies go to ``output_dir`` (not tracked by git).

    Args:
        smoke: pass ``smoke=True`` (tiny sample counts) to every notebook.
        figures_dir: where notebooks write figures; default ``<repo>/figures`` for full runs and
            ``<output_dir>/../figures-smoke`` for smoke runs, so smoke runs never overwrite the gallery.
        results_dir: root of the cached result tables, one sub-folder per notebook; default
            ``<repo>/data/results`` for full runs (shipped, so a clean clone reuses them) and
            ``<output_dir>/../results-smoke`` for smoke runs.
        jobs: notebooks executed at once (each in its own kernel, one torch thread), longest first by
            :func:`expected_seconds` (file order where nothing is known). A table shared by notebooks running
            at the same time may be computed twice (writes are atomic, so never torn).
        recompute: ignore cached tables and compute everything again (each table once: the notebooks get
            this call's start time, and tables created after it are reused).
        parameters: extra papermill parameters given to every notebook (e.g. ``{"model": path}``). With a
            ``model``, figures and results default to ``<output_dir>/../figures-<name>`` and
            ``results-<name>``, so the shipped gallery and tables of the embedded model stay as they are.

    Returns:
        one record per notebook with its name, seconds and output path, in file order.
    """
    import papermill as pm

    notebook_dir = Path(notebook_dir).resolve()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    model = (parameters or {}).get("model")
    if model is not None and not smoke:
        # another model than the embedded default: keep the shipped gallery and results untouched
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model).strip("/").split("/")[-1])
        figures_dir = figures_dir or output_dir.parent / f"figures-{slug}"
        results_dir = results_dir or output_dir.parent / f"results-{slug}"
    if figures_dir is None:
        figures_dir = (output_dir.parent / "figures-smoke") if smoke else (notebook_dir.parent / "figures")
    if results_dir is None:
        results_dir = (output_dir.parent / "results-smoke") if smoke else (notebook_dir.parent / "data" / "results")
    if recompute:  # tables made before now are redone; one shared by several notebooks only once
        recompute = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    params = {"smoke": smoke, "figures_dir": str(Path(figures_dir).resolve()), "recompute": recompute,
              "results_dir": str(Path(results_dir).resolve()), **(parameters or {})}
    notebooks = find_notebooks(notebook_dir, only)
    if not notebooks:
        raise FileNotFoundError(f"no notebooks found in {notebook_dir}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    tasks, costs, recorded = [], [], _recorded_seconds(notebook_dir)
    for path in notebooks:
        costs.append(expected_seconds(Path(params["results_dir"]) / path.stem, recorded.get(path.stem)))
        nb_params = dict(params, results_dir=str(Path(params["results_dir"]) / path.stem))
        declared = set(pm.inspect_notebook(str(path)))
        # the runner's own settings go only to notebooks that declare them; the caller's always go
        nb_params = {k: v for k, v in nb_params.items() if k in declared or k in (parameters or {})}
        tasks.append((str(path), str(output_dir / path.name), nb_params, str(notebook_dir)))
    records = []
    if jobs == 1:
        for task in tasks:
            log(f"running {Path(task[0]).name} (smoke={smoke}, recompute={recompute}) ...")
            records.append(_execute(*task))
            log(f"  done in {records[-1]['seconds']:.1f} s -> {records[-1]['output']}")
    else:
        log(f"running {len(tasks)} notebooks, {jobs} at a time, longest first by their last run "
            f"(smoke={smoke}, recompute={recompute}) ...")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for record in pool.map(_execute, *zip(*longest_first(tasks, costs))):
                log(f"  {record['notebook']} done in {record['seconds']:.1f} s -> {record['output']}")
                records.append(record)
        names = [Path(task[0]).name for task in tasks]
        records.sort(key=lambda r: names.index(r["notebook"]))
    default_results = Path(results_dir).resolve() == (notebook_dir.parent / "data" / "results").resolve()
    if recompute and not smoke and not only and model is None and default_results:
        # a full recompute of the embedded model: what the next schedule falls back on without manifests
        (notebook_dir / RUN_SECONDS).write_text(json.dumps(
            {Path(r["notebook"]).stem: round(r["seconds"]) for r in records}, indent=1) + "\n")
    return records
