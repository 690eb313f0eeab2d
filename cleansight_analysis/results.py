"""Result tables on disk: one tidy table per experiment, each with its manifest next to it.

``save_table(df, "runs/badnet", "stealing", model=model, settings=...)`` writes
``runs/badnet/stealing.parquet`` (or ``.csv`` when pyarrow is not installed, or when asked) and
``runs/badnet/stealing.manifest.json`` (model, attack, seed, settings, package versions, git revision,
machine). Plotting code reads tables back with :func:`load_table` and never recomputes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError
from .manifest import build_manifest, write_manifest

FORMATS = ("auto", "parquet", "csv")


def _has_parquet() -> bool:
    return importlib.util.find_spec("pyarrow") is not None or importlib.util.find_spec("fastparquet") is not None


def table_path(out_dir: str | Path, name: str, fmt: str = "auto") -> Path:
    """Where :func:`save_table` writes ``name`` (the extension depends on ``fmt`` and pyarrow)."""
    if fmt not in FORMATS:
        raise InputError(f"table format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = "parquet" if _has_parquet() else "csv"
    if fmt == "parquet" and not _has_parquet():
        raise InputError("parquet needs pyarrow (pip install pyarrow); use fmt='csv'")
    return Path(out_dir) / f"{name}.{fmt}"


def save_table(df: Any, out_dir: str | Path, name: str, *, fmt: str = "auto", model: Any = None,
               attack: Any = None, seed: int | None = None, settings: Any = None, **extra: Any) -> Path:
    """Write ``df`` and ``<name>.manifest.json`` under ``out_dir``; return the table's path.

    ``settings`` may be a dataclass, a dict or None; ``attack`` an attack object (its ``to_dict()`` is
    recorded) or a name.
    """
    from dataclasses import asdict, is_dataclass

    if not name or "/" in name:
        raise InputError(f"table name must be a plain file stem, got {name!r}")
    path = table_path(out_dir, name, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = _flat_cells(df)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)   # atomic: notebooks running at once never read a half-written table
    if is_dataclass(settings) and not isinstance(settings, type):
        settings = asdict(settings)
    attack_info = attack.to_dict() if hasattr(attack, "to_dict") else attack
    manifest = build_manifest(model=model, settings=settings, attack=attack_info, seed=seed, table=path.name,
                              rows=int(len(df)), columns=[str(c) for c in df.columns], **extra)
    write_manifest(Path(out_dir) / f"{name}.manifest.json", manifest)
    return path


def _flat_cells(df: Any) -> Any:
    """Array- or list-valued cells (e.g. an attention map per row) as JSON text, so any format holds them."""
    import numpy as np

    out = df
    for col in df.columns:
        if df[col].dtype == object and any(isinstance(v, (np.ndarray, list, tuple)) for v in df[col].head(50)):
            if out is df:
                out = df.copy()
            out[col] = [json.dumps(np.asarray(v).tolist()) if isinstance(v, (np.ndarray, list, tuple)) else v
                        for v in df[col]]
    return out


def array_cell(value: Any, dtype: Any = float) -> Any:
    """An array-valued cell as ``numpy.ndarray``, fresh (array / list) or reloaded from disk (the JSON text
    :func:`save_table` wrote); ``None``, NaN and JSON ``null`` give ``None``."""
    import numpy as np

    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bytes, str)):
        value = json.loads(value)
        if value is None:
            return None
    return np.asarray(value, dtype=dtype)


def load_table(path: str | Path) -> Any:
    """Read a table written by :func:`save_table` (``.parquet`` or ``.csv``; a stem finds either)."""
    import pandas as pd

    path = Path(path)
    if not path.suffix:
        found = [p for p in (path.with_suffix(".parquet"), path.with_suffix(".csv")) if p.is_file()]
        if not found:
            raise InputError(f"no table {path}.parquet or {path}.csv")
        path = found[0]
    if not path.is_file():
        raise InputError(f"no table at {path}")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise InputError(f"unknown table format {path.suffix!r} (expected .parquet or .csv)")


def load_manifest(table: str | Path) -> dict[str, Any]:
    """The manifest written next to a table (``stealing.csv`` -> ``stealing.manifest.json``)."""
    table = Path(table)
    path = table.with_name(f"{table.name.split('.')[0]}.manifest.json")
    if not path.is_file():
        raise InputError(f"no manifest next to {table} (expected {path})")
    return json.loads(path.read_text())
