"""Argument parsing of the ``cleansight`` command line: one-line errors, value converters, shared option
groups, and the helpers that turn options into models, attacks, samples and JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from .. import distributed, load_lvlm
from ..attacks import ATTACKS, attack_from_dict, get_attack
from ..data.real import load_dataset_folder
from ..data.synthetic import SyntheticWorld
from ..errors import AttackError, InputError, ModelSourceError, OutputExistsError
from ..models.loading import read_card
from ..models.registry import lookup, registered_models


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``cleansight analyze: error: --n must be a positive integer, got '0'``
    (exit code 2, like every other bad-input error of the command line)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (sample counts, batch sizes, jobs, steps, layers)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _int_csv(text: str) -> list[int]:
    """``"1,2,5"`` -> ``[1, 2, 5]`` (layer lists)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,5, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"layer indices are >= 0, got {text!r}")
    return values


def _unit_csv(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (intensities in [0, 1])."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1] such as 0,0.5,1, got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"intensities lie in [0, 1], got {text!r}")
    return values


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """A number in [0, 1] (poison rate, blend strength)."""
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _csv_names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _out_dir(text: str) -> str:
    """A results folder: may not exist yet (it is created), may not be a file."""

    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def _out_file(text: str) -> str:
    """An output file: its folder is created when missing; it may not be a folder."""

    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path")
    if not Path(text).name:
        raise argparse.ArgumentTypeError(f"{text!r} names no file")
    return text


def _prepare_out_file(path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _refuse_existing_tables(out: str, names: list[str], overwrite: bool) -> None:
    """``--out`` may not hold tables of these names already, unless ``--overwrite``."""
    found = sorted(p.name for name in names for p in Path(out).glob(f"{name}.*")
                   if p.suffix in (".parquet", ".csv") or p.name.endswith(".manifest.json"))
    if found and not overwrite:
        raise OutputExistsError(f"{out!r} already holds {', '.join(found)}; pass --overwrite to replace them "
                                "or choose another --out")


def _json_text(record: Any) -> str:
    """Strictly valid JSON: NaN / inf become ``null`` and each such key is listed under ``"undefined"``
    with the reason (a metric with no sample to measure it on, e.g. ASR without an attack)."""

    undefined: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            undefined[key] = f"{value!r} in the computation: no sample defines it (e.g. no attack, or one class only)"
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if undefined and isinstance(out, dict):
        out["undefined"] = undefined
    return json.dumps(out, indent=2, default=str, allow_nan=False)


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def _attack_from_args(args: argparse.Namespace, card: dict | None = None, *, announce: bool = False):
    """The attack of ``--attack`` and the trigger flags.

    When the model's card names an attack of the same kind (or ``--attack`` is not given), the card's
    trigger is the starting point and only the flags given explicitly change it, so ``--location`` alone
    never swaps the model's own 4 px patch for a preset's default size. ``announce`` prints (to stderr)
    which trigger is used and where it came from.
    """


    params = _trigger_params(args)
    card_attack = (card or {}).get("attack") if isinstance((card or {}).get("attack"), dict) else None
    if not args.attack and card_attack is None:
        if params:
            raise AttackError(f"trigger flags ({', '.join(sorted(params))}) need --attack NAME: the model's card "
                              "names no attack")
        return None
    name = ATTACKS.get(args.attack).name if args.attack else card_attack["name"]
    if card_attack is not None and ATTACKS.get(card_attack["name"]).name == name:
        attack = attack_from_dict(card_attack)
        accepted = {f.name for f in dataclasses.fields(attack) if f.init}
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise AttackError(f"attack {name!r} has no parameter(s) {', '.join(unknown)}; accepted: "
                              f"{', '.join(sorted(accepted))}")
        attack = dataclasses.replace(attack, **params) if params else attack
        source = "the model card" + (f", with {', '.join(sorted(params))} from the command line" if params else "")
    else:
        attack = get_attack(name, **params)
        source = f"the {attack.preset!r} preset" + (f", with {', '.join(sorted(params))} from the command line"
                                                    if params else "")
    if announce:
        print(f"trigger: {attack.describe()} (from {source})", file=sys.stderr)
    return attack


def _trigger_params(args: argparse.Namespace) -> dict[str, Any]:
    """The trigger fields the user set explicitly on the command line."""
    params: dict[str, Any] = {}
    if getattr(args, "trigger_image", None):  # custom: the trigger picture; badnet / blended / ...: its pattern
        params["trigger" if (args.attack or "").lower() == "custom" else "pattern"] = args.trigger_image
    if getattr(args, "location", None):
        loc = args.location
        try:
            params["location"] = tuple(_int_or_float(v) for v in loc.split(",")) if "," in loc else loc
        except ValueError:
            raise AttackError(f"--location must be a corner name, 'random' or X,Y numbers, got {loc!r}") from None
    if getattr(args, "alpha", None) is not None:
        params["alpha"] = args.alpha
    if getattr(args, "size", None) is not None:
        params["size"] = args.size
    if getattr(args, "target", None):
        params["target"] = args.target
    return params


def _training_samples(spec: str, n: int, seed: int):
    if spec == "synthetic":
        world = SyntheticWorld(seed)
        n_cap = n // 7
        return world.samples("train", n - n_cap) + world.samples("train", n_cap, start=10**6, task="caption")
    if ":" not in spec:
        raise InputError(f"--data must be 'synthetic' or NAME:FOLDER (coco, vqav2, okvqa, flickr8k), got {spec!r}")

    name, root = spec.split(":", 1)
    return load_dataset_folder(name, root, limit=n, seed=seed)


def _defense_settings(text: str | None) -> dict[str, Any]:
    """``--defense-settings`` JSON (``'{"quantile": 0.95}'``) as a dict."""

    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--defense-settings must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(out, dict):
        raise InputError(f"--defense-settings must be a JSON object, got {text!r}")
    return out


def _model_and_attack(args: argparse.Namespace, *, need_attack: bool = False):
    """The model named by ``--model`` and the attack from the flags or, failing that, the model's card."""

    entry = lookup(args.model)
    if entry is None and not Path(args.model).is_dir():
        known = ", ".join(m.name for m in registered_models())
        raise ModelSourceError(f"--model {args.model!r} is neither a registered model nor a local folder "
                               f"(registered: {known})")
    card = entry.card if entry is not None else read_card(Path(args.model))
    attack = _attack_from_args(args, card, announce=True)
    if need_attack and attack is None:
        raise InputError(f"{args.model} has no attack in its card: pass --attack NAME")
    return load_lvlm(args.model, device=_process_device(args.device)), attack


def _process_device(device: str | None) -> str | None:
    """``--device``; under ``accelerate launch`` no device (or plain ``cuda``) means this process's own
    (``cuda:<local rank>``; ``cpu`` on a machine without a GPU), so N processes do not share one GPU."""
    if distributed.launched() and device in (None, "cuda"):
        return distributed.device()
    return device


def _eval_samples(args: argparse.Namespace):
    """``--n`` held-out samples: the synthetic test split, or a real dataset folder (``NAME:FOLDER``)."""
    if args.data == "synthetic":
        return SyntheticWorld(args.seed).samples("test", args.n)
    return _training_samples(args.data, args.n, args.seed)


def _int_or_float(text: str) -> int | float:
    """``"4"`` -> 4 (pixels), ``"0.09"`` -> 0.09 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", default=None, help="badnet, blended, sig, wanet, trojvlm, vlood or custom")
    p.add_argument("--trigger-image", default=None, help="trigger image file (custom attack / BadNet pattern)")
    p.add_argument("--location", default=None, help="corner name (top-left, ...), 'random', or X,Y")
    p.add_argument("--alpha", type=_fraction, default=None, help="blend strength (blended / custom blend)")
    p.add_argument("--size", type=_int_or_float, default=None,
                   help="patch side: pixels (an integer) or a fraction of the short side (e.g. 0.09)")
    p.add_argument("--target", default=None, help="target phrase (default 'you have been hacked lol')")
