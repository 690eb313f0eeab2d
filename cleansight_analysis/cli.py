"""The ``cleansight`` command line.

    cleansight info                         versions, threads, devices, registered models
    cleansight models list                  the model registry
    cleansight inspect --model M --image I  per-layer token-group shares of the answer query
    cleansight figures [--smoke]            run the figure notebooks (what `make figures` calls)
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _console():
    from rich.console import Console

    return Console()


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .manifest import build_manifest
    from .models import SUPPORTED_ARCHITECTURES, registered_models

    from rich.table import Table

    m = build_manifest()
    con = _console()
    table = Table(title="cleansight-analysis", show_header=False)
    for k, v in m["versions"].items():
        table.add_row(k, str(v))
    table.add_row("git revision", str(m["git_revision"]))
    table.add_row("torch threads", str(torch.get_num_threads()))
    table.add_row("CUDA", str(m["machine"]["cuda"]))
    table.add_row("architectures", ", ".join(SUPPORTED_ARCHITECTURES))
    table.add_row("registered models", ", ".join(r.name for r in registered_models()))
    con.print(table)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .models import registered_models

    table = Table(title="registered models (load with cleansight_analysis.load_lvlm(name))")
    table.add_column("name")
    table.add_column("source")
    table.add_column("description")
    for entry in registered_models():
        table.add_row(entry.name, "builder" if entry.builder else str(entry.path), entry.description)
    _console().print(table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from . import GROUP_NAMES, load_lvlm

    model = load_lvlm(args.model, device=args.device)
    batch = model.prepare(args.image, args.prompt)
    rows = model.attention_rows(batch, layers=args.layers)
    frame = rows.to_frame()
    if args.csv:
        frame.to_csv(args.csv, index=False)
    table = Table(title=f"{model.name}: share of the answer query's attention (mean over heads)")
    table.add_column("layer", justify="right")
    for g in GROUP_NAMES:
        table.add_column(g, justify="right")
    pivot = frame.pivot_table(index="layer", columns="group", values="mass", aggfunc="mean", observed=True)
    for layer, row in pivot.iterrows():
        table.add_row(str(layer), *(f"{row[g]:.3f}" for g in GROUP_NAMES))
    _console().print(table)
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .notebooks import run_notebooks

    params = {}
    if args.model:
        params["model"] = args.model
    if args.device:
        params["device"] = args.device
    records = run_notebooks(args.notebooks, args.output, smoke=args.smoke, only=args.only, parameters=params,
                            figures_dir=args.figures_dir)
    total = sum(r["seconds"] for r in records)
    print(f"{len(records)} notebook(s) in {total:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleansight", description="Attention stealing in backdoored LVLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, devices, registered models").set_defaults(fn=cmd_info)
    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list registered models").set_defaults(fn=cmd_models_list)
    ins = sub.add_parser("inspect", help="token-group attention shares of one image + prompt")
    ins.add_argument("--model", default="tiny-random-llava", help="registry name or local model folder")
    ins.add_argument("--image", required=True, help="image file")
    ins.add_argument("--prompt", default="What is in the image?")
    ins.add_argument("--layers", type=int, nargs="*", default=None, help="LM layers (default all)")
    ins.add_argument("--device", default=None)
    ins.add_argument("--csv", default=None, help="also write the tidy table to this CSV file")
    ins.set_defaults(fn=cmd_inspect)
    fig = sub.add_parser("figures", help="run the figure notebooks with papermill")
    fig.add_argument("--smoke", action="store_true", help="tiny sample counts; figures go to build/figures-smoke")
    fig.add_argument("--only", nargs="*", default=None, help="run notebooks whose name contains one of these")
    fig.add_argument("--notebooks", default="notebooks")
    fig.add_argument("--output", default="build/notebooks", help="where executed notebooks are written")
    fig.add_argument("--figures-dir", default=None)
    fig.add_argument("--model", default=None, help="override every notebook's `model` parameter")
    fig.add_argument("--device", default=None, help="override every notebook's `device` parameter")
    fig.set_defaults(fn=cmd_figures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import CleanSightError

    try:
        return int(args.fn(args) or 0)
    except CleanSightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
