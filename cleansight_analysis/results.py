"""Result tables on disk: one tidy table per experiment, each with its manifest next to it.

``save_table(df, "runs/badnet", "stealing", model=model, settings=...)`` writes
``runs/badnet/stealing.parquet`` (or ``.csv`` when pyarrow is not installed, or when asked) and
``runs/badnet/stealing.manifest.json`` (model, attack, seed, settings, package versions, git revision,
machine, and the table's row count and ``table_sha256``). Plotting code reads tables back with
:func:`load_table` and never recomputes.

The pair is written as one unit: table and manifest go into a temporary folder next to them, then the
old manifest is removed, the table moved into place and the manifest last. The manifest is the commit
point: it holds the sha256 of the table's bytes, and :func:`verify_table` accepts a table only when a
manifest next to it names it, matches its hash and its row count. A kill at any moment leaves either the
old pair, a table without a manifest, or a table that does not match its manifest: never one that passes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import zlib
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .manifest import build_manifest

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

    if not name or "/" in name:
        raise InputError(f"table name must be a plain file stem, got {name!r}")
    path = table_path(out_dir, name, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = _flat_cells(df)
    if is_dataclass(settings) and not isinstance(settings, type):
        settings = asdict(settings)
    attack_info = attack.to_dict() if hasattr(attack, "to_dict") else attack
    mpath = manifest_path(path)
    _remove_stale_staging(path.parent, name)
    staging = path.parent / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        staged = staging / path.name
        if path.suffix == ".parquet":
            df.to_parquet(staged, index=False)
        else:
            df.to_csv(staged, index=False)
        manifest = build_manifest(model=model, settings=settings, attack=attack_info, seed=seed, table=path.name,
                                  rows=int(len(df)), columns=[str(c) for c in df.columns],
                                  table_sha256=file_sha256(staged), **extra)
        staged_manifest = staging / mpath.name
        staged_manifest.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        # Commit: no manifest, then the new table, then its manifest (the commit point). A reader in between
        # sees a table without a manifest, or one that does not match it; verify_table rejects both.
        mpath.unlink(missing_ok=True)
        os.replace(staged, path)
        os.replace(staged_manifest, mpath)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _remove_stale_staging(folder: Path, name: str) -> None:
    """Remove staging folders of ``name`` left by writers that were killed (their process is gone)."""
    for stale in folder.glob(f".{name}.*.tmp"):
        pid = stale.name[len(name) + 2:-len(".tmp")]
        if not stale.is_dir() or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def manifest_path(table: str | Path) -> Path:
    """The manifest next to a table (``stealing.parquet`` -> ``stealing.manifest.json``)."""
    table = Path(table)
    return table.with_name(f"{table.name.split('.')[0]}.manifest.json")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, as hex (what a manifest's ``table_sha256`` holds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_table(path: str | Path) -> str | None:
    """None when the table at ``path`` may be used, else why not, in one line naming the file.

    The one rule for using a saved table: it exists and is not empty, a readable manifest sits next to it,
    the manifest names this file, and the file's sha256 (and, for parquet, row count) equal the manifest's
    ``table_sha256`` (and ``rows``). Catches a table whose write or manifest was cut short, a stale table
    from another run, and edited values.
    """
    path = Path(path)
    mpath = manifest_path(path)
    if not path.is_file():
        return f"table {path} is missing" + (f" (its manifest {mpath} is there)" if mpath.is_file() else "")
    if not mpath.is_file():
        return f"table {path} has no manifest (expected {mpath})"
    try:
        manifest = load_manifest(path)
    except InputError as exc:
        return str(exc)
    named = manifest.get("table")
    if named is not None and named != path.name:
        return f"manifest {mpath} describes {named}, not {path.name}"
    expected = manifest.get("table_sha256")
    if not isinstance(expected, str):
        return f"manifest {mpath} has no table_sha256 (written before tables were hashed)"
    if path.stat().st_size == 0:
        return f"table {path} is empty (0 bytes)"
    try:
        actual = file_sha256(path)
    except OSError as exc:
        return f"table {path} is unreadable ({exc.strerror or exc})"
    if actual != expected:
        return f"table {path} does not match its manifest (sha256 differs)"
    rows = manifest.get("rows")
    if path.suffix == ".parquet" and isinstance(rows, int):
        try:
            import pyarrow.parquet as pq

            found = pq.read_metadata(path).num_rows
        except ImportError:
            found = rows
        except Exception as exc:  # noqa: BLE001 - any reader failure means: do not use it
            return f"table {path} is unreadable ({_first_line(exc)})"
        if found != rows:
            return f"table {path} has {found} rows, its manifest says {rows}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _flat_cells(df: Any) -> Any:
    """Array- or list-valued cells (e.g. an attention map per row) as JSON text, so any format holds them."""

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
    if path.suffix not in (".parquet", ".csv"):
        raise InputError(f"unknown table format {path.suffix!r} (expected .parquet or .csv)")
    if path.stat().st_size == 0:
        raise InputError(f"table {path} is empty (0 bytes)")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except ImportError as exc:
        raise InputError(f"cannot read {path}: {exc} (pip install pyarrow)") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow / pandas raise many types for a damaged file
        raise InputError(f"table {path} is unreadable, maybe truncated ({_first_line(exc)})") from None


def load_manifest(table: str | Path) -> dict[str, Any]:
    """The manifest written next to a table (``stealing.csv`` -> ``stealing.manifest.json``)."""
    table = Path(table)
    path = manifest_path(table)
    if not path.is_file():
        raise InputError(f"no manifest next to {table} (expected {path})")
    try:
        manifest = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InputError(f"manifest {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"manifest {path} is not valid JSON, maybe truncated ({exc.msg} at line {exc.lineno})") \
            from None
    except OSError as exc:
        raise InputError(f"manifest {path} is unreadable ({exc.strerror or exc})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"manifest {path} holds a JSON {type(manifest).__name__}, not an object")
    return manifest


# ------------------------------------------------------------------ figures
def save_figure(fig, path_stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.png`` and ``<path_stem>.pdf``; returns both paths.

    A file whose drawing is unchanged is left as it is on disk, so re-running a notebook on unchanged
    tables leaves the gallery (and ``git status``) untouched: PNGs are compared byte for byte, PDFs by
    their content (:func:`pdf_content`): coordinates at 0.01 pt and the sign of zero ignored, which is
    the float noise that differs between CPUs (FMA / SIMD kernels) in float32 results and in matplotlib's
    transforms.
    """
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=p.suffix[1:], metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
        data = buffer.getvalue()
        if p.is_file():
            old = p.read_bytes()
            if old == data or (p.suffix == ".pdf" and pdf_content(old) == pdf_content(data)):
                continue
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
    return paths


def pdf_content(data: bytes) -> list[bytes]:
    """The streams of a PDF (decompressed), decimal numbers rounded to 0.01 and signed zeros written as
    zeros: what a reader draws.

    Args:
        data: the bytes of a PDF file written by matplotlib.
    Returns:
        one entry per stream (page contents, fonts, images), in file order.
    """
    out = []
    for match in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, flags=re.S):
        body = match.group(1)
        try:
            body = zlib.decompress(body)
        except zlib.error:
            pass
        out.append(re.sub(rb"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])", _coarse_number, body))
    return out


def _coarse_number(match: Any) -> bytes:
    """A PDF coordinate at 0.01 pt (1/7200 inch, far below what any viewer draws); ``-0`` -> ``0``."""
    value = round(float(match.group(0)), 2)
    return b"%.2f" % (value + 0.0)  # + 0.0 turns -0.0 into 0.0
