"""Provenance written next to every result table and benchmark: versions, git revision, settings.

Manifests hold no absolute paths of the machine that wrote them: a path inside the repository is stored
relative to the repository root (:func:`portable`), so shipped result files read the same on every clone.
"""

from __future__ import annotations

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


def build_manifest(*, model: Any = None, settings: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON-serialisable manifest: what ran, on what, with which versions (paths made :func:`portable`)."""
    import torch

    manifest: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
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
