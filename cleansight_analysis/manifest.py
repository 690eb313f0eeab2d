"""Provenance written next to every result table and benchmark: versions, git revision, settings.

Manifests hold no absolute paths of the machine that wrote them: a path inside the repository is stored
relative to the repository root (:func:`portable`), so shipped result files read the same on every clone.

Two fingerprints say what computed a result, so that a cached table can be refused when either changed
(:meth:`cleansight_analysis.experiments.FigureContext.cached`):

- :func:`code_fingerprint`: sha256 over the package's source (every ``*.py`` file and the package data
  under ``assets/``, by path relative to the package, line endings normalised to LF, ``__pycache__`` and
  hidden files skipped). ``plotting``, ``training``, ``cli`` and ``notebooks.py`` are left out
  (:data:`CODE_EXCLUDE`): they never compute a table (tests check that no table code imports them), so
  editing a figure's look, a command-line option or the recipe that trains the tiny models keeps every
  cached table (a retrained model changes the model fingerprint instead).
  Computed from the files on disk, it is the same on every clone of one commit, whatever the OS.
- :func:`model_files_fingerprint`: sha256 over a model folder's files (path, size, and the bytes; for a
  file above :data:`FULL_HASH_LIMIT` only the safetensors header and the first and last MiB), cheap
  enough to run before every cached table, also for a 7B checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("cleansight-analysis", "torch", "transformers", "transformer-lens", "tokenizers", "peft",
             "numpy", "pandas")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide numerical results."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: str | Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` if the tree has changes), or None outside a git checkout."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def repo_root() -> Path | None:
    """The checkout this package runs from (the folder holding ``pyproject.toml``), or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as stored in a result file: relative to the repository root when inside it (POSIX
    separators), else unchanged."""
    text = os.fspath(path)
    root = repo_root()
    if root is None or not os.path.isabs(text):
        return text
    for candidate in (Path(os.path.normpath(text)), Path(text).resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return text


def portable(value: Any) -> Any:
    """``value`` (nested dicts / lists / strings) with every repository path made relative to the root.

    A string starting with the absolute repository root (``/home/me/cleansight/data/x``), or holding it
    after a ``NAME:`` prefix (``vqav2:/home/me/cleansight/data/vqav2``), loses the root prefix.
    """
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value
    root = repo_root()
    if root is None or str(root) not in value:
        return value
    if value.startswith(str(root)):
        return portable_path(value)
    prefix, sep, rest = value.partition(":")
    if sep and rest.startswith(str(root)):
        return f"{prefix}:{portable_path(rest)}"
    return value


#: Parts of ``cleansight_analysis`` left out of :func:`code_fingerprint`: they never compute a table
#: (``plotting`` only reads tables; ``training`` writes model folders, which :func:`model_files_fingerprint`
#: covers; ``cli`` and ``notebooks.py`` sit on top and only call the rest).
CODE_EXCLUDE: tuple[str, ...] = ("plotting", "training", "cli", "notebooks.py")
#: Suffixes of files whose line endings are normalised (CRLF -> LF) before hashing.
_TEXT_SUFFIXES = (".py", ".json", ".jinja", ".txt", ".md", ".yaml", ".yml", ".cfg", ".toml")
#: Files up to this size are hashed whole by :func:`model_files_fingerprint`; larger ones by header and ends.
FULL_HASH_LIMIT = 64 << 20
_EDGE = 1 << 20


def _skipped(rel: Path) -> bool:
    return any(part == "__pycache__" or part.startswith(".") for part in rel.parts)


def _file_digest(path: Path, *, partial: bool = False) -> str:
    """sha256 of a file's bytes (text files with LF line endings); ``partial``: header and ends only."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if not partial:
            data = handle.read()
            if path.suffix.lower() in _TEXT_SUFFIXES:
                data = data.replace(b"\r\n", b"\n")
            h.update(data)
            return h.hexdigest()
        if path.suffix == ".safetensors":            # 8-byte little-endian length, then the JSON header
            head = handle.read(8)
            h.update(head)
            if len(head) == 8:
                h.update(handle.read(min(int.from_bytes(head, "little"), 100 << 20)))
        handle.seek(0)
        h.update(handle.read(_EDGE))
        handle.seek(max(0, size - _EDGE))
        h.update(handle.read(_EDGE))
    return h.hexdigest()


@functools.lru_cache(maxsize=4096)
def _cached_file_digest(path: str, size: int, mtime_ns: int) -> str:
    return _file_digest(Path(path), partial=size > FULL_HASH_LIMIT)


def _tree_fingerprint(files: list[tuple[str, Path]], digest) -> str:
    h = hashlib.sha256()
    for rel, path in sorted(files):
        h.update(f"{rel}\0{digest(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def _code_files(base: Path, exclude: tuple[str, ...]) -> list[tuple[str, Path]]:
    files = []
    for path in base.rglob("*"):
        rel = path.relative_to(base)
        if not path.is_file() or _skipped(rel) or (rel.parts and rel.parts[0] in exclude):
            continue
        if path.suffix == ".py" or "assets" in rel.parts[:-1]:
            files.append((rel.as_posix(), path))
    return files


_OWN_CODE: dict[tuple[str, ...], str] = {}


def code_fingerprint(root: str | os.PathLike | None = None, *, exclude: tuple[str, ...] = CODE_EXCLUDE) -> str:
    """``"sha256:<hex>"`` of the package source under ``root`` (default: this package); see the module docstring.

    For this package the value is computed once per process (the code a process runs is the code it
    imported); for another ``root`` on every call.
    """
    exclude = tuple(exclude)
    if root is None:
        if exclude not in _OWN_CODE:
            base = Path(__file__).resolve().parent
            _OWN_CODE[exclude] = _tree_fingerprint(_code_files(base, exclude), _file_digest)
        return _OWN_CODE[exclude]
    return _tree_fingerprint(_code_files(Path(root), exclude), _file_digest)


def model_files_fingerprint(folder: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over the files of a model folder (sub-folders included, hidden files skipped).

    Per file: its path relative to ``folder`` and the sha256 of its bytes (line endings of text files
    normalised); a file above :data:`FULL_HASH_LIMIT` counts by its size, safetensors header and first and
    last MiB instead (cheap for multi-GB shards; a re-trained shard that keeps its size, header and both
    ends unchanged goes unnoticed, but its ``card.json`` or config usually does not). Remembered per
    file path, size and modification time within a process.
    """
    base = Path(folder)
    files = []
    for path in base.rglob("*"):
        rel = path.relative_to(base)
        if path.is_file() and not _skipped(rel):
            files.append((rel.as_posix(), path))

    def digest(path: Path) -> str:
        st = path.stat()
        return f"{st.st_size}:{_cached_file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)}"

    return _tree_fingerprint(files, digest)


def short(fingerprint: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of a ``"sha256:<hex>"`` fingerprint (for messages); ``None`` -> ``'none'``."""
    if fingerprint is None:
        return "none"
    return str(fingerprint).split(":", 1)[-1][:n]


def build_manifest(*, model: Any = None, settings: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON-serialisable manifest: what ran, on what, with which versions (paths made :func:`portable`)."""
    import torch  # lazy: provenance helpers are imported before torch by tools that never load a model

    manifest: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "code_fingerprint": code_fingerprint(),
        "versions": package_versions(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "settings": settings or {},
    }
    if model is not None:
        manifest["model"] = {"name": getattr(model, "name", str(model)),
                             "architecture": getattr(getattr(model, "family", None), "architecture", None),
                             "n_layers": getattr(model, "n_layers", None), "n_heads": getattr(model, "n_heads", None),
                             "dtype": str(getattr(model, "dtype", ""))}
    manifest.update(extra)
    return portable(manifest)


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)   # atomic: a reader never sees half a manifest
    return path
