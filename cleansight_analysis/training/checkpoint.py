"""Resumable training checkpoints in safetensors + JSON (no pickle anywhere)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError

STATE = "state.json"
WEIGHTS = "trainable.safetensors"
OPTIM = "optimizer.safetensors"


def save_checkpoint(folder: str | Path, named_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int, meta: dict[str, Any]) -> Path:
    """Write trainable weights, AdamW moments and the step, atomically (temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named_params.items()}, str(tmp / WEIGHTS))
    moments: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    index = {id(p): name for name, p in named_params.items()}
    for p, state in optimizer.state.items():
        name = index.get(id(p))
        if name is None:
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                moments[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                steps[f"{name}::{key}"] = float(value)
    save_file(moments, str(tmp / OPTIM))
    state = {"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "optimizer_scalars": steps, "meta": meta}
    (tmp / STATE).write_text(json.dumps(state, default=str))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)
    return folder


def load_checkpoint(folder: str | Path, named_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[int, dict[str, Any]]:
    """Restore what :func:`save_checkpoint` wrote; returns ``(step, meta)``."""
    folder = Path(folder)
    state = json.loads((folder / STATE).read_text())
    weights = load_file(str(folder / WEIGHTS))
    missing = sorted(set(named_params) - set(weights))
    unexpected = sorted(set(weights) - set(named_params))
    if missing or unexpected:  # e.g. a LoRA checkpoint resumed as projector-only training: not a bare KeyError
        raise InputError(f"checkpoint {str(folder)!r} does not match the parameters being trained "
                         f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                         f"{unexpected[:2]}); it was written by another training setup")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    moments = load_file(str(folder / OPTIM))
    for name, p in named_params.items():
        st: dict[str, Any] = {}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if f"{name}::{key}" in moments:
                st[key] = moments[f"{name}::{key}"].to(p.device)
        if f"{name}::step" in state["optimizer_scalars"]:
            st["step"] = torch.tensor(state["optimizer_scalars"][f"{name}::step"])
        if st:
            optimizer.state[p] = st
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict restores the schedule, not the optimizer's current rate
    return int(state["step"]), state.get("meta", {})


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / STATE).is_file()


def checkpoint_info(folder: str | Path) -> tuple[int, dict[str, Any]]:
    """``(step, meta)`` of a checkpoint, read from its JSON state only (no tensors loaded)."""
    path = Path(folder) / STATE
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"checkpoint state {str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(state, dict):
        raise InputError(f"checkpoint state {str(path)!r} is not a JSON object")
    meta = state.get("meta")
    return int(state.get("step") or 0), (meta if isinstance(meta, dict) else {})
