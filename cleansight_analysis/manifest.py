"""Provenance written next to every result table and benchmark: versions, git revision, settings."""

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


def build_manifest(*, model: Any = None, settings: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON-serialisable manifest: what ran, on what, with which versions."""
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
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)   # atomic: a reader never sees half a manifest
    return path
