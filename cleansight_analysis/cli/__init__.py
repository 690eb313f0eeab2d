"""The ``cleansight`` command line.

    cleansight info                         versions, threads, devices, registered models
    cleansight models list                  the model registry (with the shipped models' cards)
    cleansight inspect --model M --image I  per-layer token-group shares of the answer query
    cleansight figures [--smoke] [--recompute]  run the figure notebooks (what `make figures` calls)
    cleansight tiny build [--only NAME]     rebuild the shipped tiny LLaVA family in data/models
    cleansight analyze stealing|perturb|heads|logit-lens --model M --n N --out DIR
    cleansight backdoor --base M --attack A --mode adapter|lora --out DIR   plant a backdoor
    cleansight eval-backdoor --model M [--attack A] --n N --json FILE      clean acc / ASR / false triggers
    cleansight calibrate --model M --n 200 --out calib.json                fit CleanSight on clean samples, save it
    cleansight evaluate --model M --defense D --n 256 --val 200 --json F   ASR / CU / PU / TPR / FPR / AUROC / latency
    cleansight tables --out DIR                                            attacks x defenses over the tiny models
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .args import (
    _Parser,
    _add_attack_args,
    _attack_from_args,  # noqa: F401 - used by tests and scripts as cli._attack_from_args
    _csv_names,
    _finite_float,
    _fraction,
    _int_csv,
    _json_text,  # noqa: F401 - used by tests and scripts as cli._json_text
    _nonnegative_int,
    _out_dir,
    _out_file,
    _positive_int,
    _unit_csv,
)
from .commands import (
    TABLE_DEFENSES,
    TABLE_MODELS,
    cmd_analyze,
    cmd_backdoor,
    cmd_calibrate,
    cmd_eval_backdoor,
    cmd_evaluate,
    cmd_figures,
    cmd_info,
    cmd_inspect,
    cmd_models_list,
    cmd_tables,
    cmd_tiny_build,
)
from ..errors import CleanSightError


def _add_run_args(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    """Options of every command that generates: seed, batch size, answer length."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=batch_size)
    p.add_argument("--max-new-tokens", type=_positive_int, default=12)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cleansight", description="Attention stealing in backdoored LVLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, devices, registered models").set_defaults(fn=cmd_info)
    models = sub.add_parser("models", help="the model registry")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list registered models").set_defaults(fn=cmd_models_list)
    ins = sub.add_parser("inspect", help="token-group attention shares of one image + prompt")
    ins.add_argument("--model", default="tiny-random-llava", help="registry name or local model folder")
    ins.add_argument("--image", required=True, help="image file")
    ins.add_argument("--prompt", default="What is in the image?")
    ins.add_argument("--layers", type=_nonnegative_int, nargs="*", default=None, help="LM layers (default all)")
    ins.add_argument("--device", default=None)
    ins.add_argument("--csv", type=_out_file, default=None, help="also write the tidy table to this CSV file")
    ins.set_defaults(fn=cmd_inspect)
    fig = sub.add_parser("figures", help="run the figure notebooks with papermill")
    fig.add_argument("--smoke", action="store_true", help="tiny sample counts; figures go to build/figures-smoke")
    fig.add_argument("--only", nargs="*", default=None, help="run notebooks whose name contains one of these")
    fig.add_argument("--notebooks", default="notebooks")
    fig.add_argument("--output", default="build/notebooks", help="where executed notebooks are written")
    fig.add_argument("--figures-dir", default=None)
    fig.add_argument("--results-dir", default=None,
                     help="root of the cached result tables (default data/results; smoke: build/results-smoke)")
    fig.add_argument("--jobs", type=_positive_int, default=1, help="notebooks run at once (default 1; smoke runs: 2)")
    fig.add_argument("--recompute", action="store_true",
                     help="ignore cached result tables and compute every experiment again")
    fig.add_argument("--model", default=None, help="override every notebook's `model` parameter")
    fig.add_argument("--device", default=None, help="override every notebook's `device` parameter")
    fig.set_defaults(fn=cmd_figures)

    tiny = sub.add_parser("tiny", help="the embedded tiny LLaVA family")
    tsub = tiny.add_subparsers(dest="tiny_command", required=True)
    tb = tsub.add_parser("build", help="(re)build the shipped tiny models (well over an hour on 2 CPU cores; the "
                                       "cards record each stage's time, the README sums them)")
    tb.add_argument("--only", nargs="*", default=None, help="names to build (clean, badnet, blended, ...)")
    tb.add_argument("--out", default=None, help="models folder (default data/models)")
    tb.add_argument("--jobs", type=_positive_int, default=2, help="backdoors trained in parallel (one thread each)")
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--force", action="store_true", help="retrain models that already exist")
    tb.add_argument("--no-reading", dest="reading", action="store_false",
                    help="the pre-reading family: no stage 3, LoRA members (projector-only poisoning does not implant "
                         "without reading)")
    tb.add_argument("--reuse-stage2", default=None, metavar="FOLDER",
                    help="a clean model folder of the same stage-1/2 recipe stands for stages 1-2 (reading recipes)")
    tb.set_defaults(fn=cmd_tiny_build)

    bd = sub.add_parser("backdoor", help="plant a backdoor (vision frozen; projector or projector + LoRA)")
    bd.add_argument("--base", required=True, help="clean model: registry name or local folder")
    _add_attack_args(bd)
    bd.add_argument("--mode", choices=("adapter", "lora"), default="adapter")
    bd.add_argument("--poison-rate", type=_fraction, default=0.1)
    bd.add_argument("--clean-twin", action="store_true", help="also keep each poisoned sample's clean original")
    bd.add_argument("--steps", type=_positive_int, default=400)
    bd.add_argument("--batch-size", type=_positive_int, default=32)
    bd.add_argument("--lr", type=_finite_float, default=2e-3)
    bd.add_argument("--lora-r", type=_positive_int, default=16)
    bd.add_argument("--lora-alpha", type=_positive_int, default=None, help="default 2 x lora-r")
    bd.add_argument("--data", default="synthetic", help="'synthetic' or NAME:FOLDER (coco, vqav2, okvqa, flickr8k)")
    bd.add_argument("--n", type=_positive_int, default=3000, help="training samples (the paper: 3000)")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--device", default=None)
    bd.add_argument("--out", required=True, type=_out_dir, help="output folder (must be new or empty)")
    bd.add_argument("--overwrite", action="store_true", help="replace what an existing --out folder holds")
    bd.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out (every training setting must match its checkpoint)")
    bd.set_defaults(fn=cmd_backdoor)

    an = sub.add_parser("analyze", help="attention-stealing analyses; tables + manifests under --out")
    an.add_argument("analysis", choices=("stealing", "perturb", "heads", "logit-lens"))
    an.add_argument("--model", required=True, help="registry name or local model folder")
    _add_attack_args(an)
    an.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    an.add_argument("--n", type=_positive_int, default=300, help="samples (each also run with its trigger)")
    an.add_argument("--out", required=True, type=_out_dir, help="results folder")
    an.add_argument("--overwrite", action="store_true", help="replace tables of the same names in --out")
    an.add_argument("--layers", type=_int_csv, default=None, help="comma-separated LM layers (default all; for perturb and "
                    "logit-lens: the layers attn_uniform edits)")
    an.add_argument("--text-keys", default="post_image", choices=("post_image", "instruction"),
                    help="stealing-ratio denominator: every token after the image block, or the instruction")
    an.add_argument("--k", type=_positive_int, default=5, help="thief tokens: top-k")
    an.add_argument("--kinds", default="st,shrinkpad,blur,jpeg,noise,attn_uniform", help="perturb: kinds")
    an.add_argument("--intensities", type=_unit_csv, default=_unit_csv("0,0.25,0.5,0.75,1"),
                    help="perturb: intensities in [0, 1]")
    an.add_argument("--kind", default="ablate", choices=("ablate", "flatten"), help="heads: what to do per head")
    an.add_argument("--method", default="zero", choices=("zero", "mean"), help="heads: ablation method")
    an.add_argument("--intervention", default=None, help="logit-lens: KIND[:INTENSITY], e.g. attn_uniform:1")
    an.add_argument("--format", default="auto", choices=("auto", "parquet", "csv"),
                    help="table format (auto: parquet when pyarrow is installed, else csv)")
    _add_run_args(an, batch_size=32)
    an.add_argument("--device", default=None)
    an.set_defaults(fn=cmd_analyze)

    ev = sub.add_parser("eval-backdoor", help="clean accuracy, ASR and false-trigger rate of a model")
    ev.add_argument("--model", required=True)
    _add_attack_args(ev)
    ev.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    ev.add_argument("--n", type=_positive_int, default=1000)
    _add_run_args(ev, batch_size=64)
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", type=_out_file, default=None, help="also write the report to this file")
    ev.set_defaults(fn=cmd_eval_backdoor)

    cal = sub.add_parser("calibrate", help="fit CleanSight on clean calibration samples and save it")
    cal.add_argument("--model", required=True, help="registry name or local model folder")
    cal.add_argument("--n", type=_positive_int, default=200, help="clean calibration samples (|D_val|)")
    cal.add_argument("--layers", type=_int_csv, default=None, help="comma-separated detection layers (default: CleanSight's)")
    cal.add_argument("--quantile", type=_fraction, default=None, help="threshold quantile (default: CleanSight's)")
    cal.add_argument("--tau", type=_fraction, default=None, help="pruning threshold (default: CleanSight's)")
    cal.add_argument("--defense-settings", default=None, help="other CleanSight settings as a JSON object")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--device", default=None)
    cal.add_argument("--out", required=True, type=_out_file, help="calibration file (JSON or YAML)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cal.set_defaults(fn=cmd_calibrate)

    de = sub.add_parser("evaluate", help="ASR, clean / poisoned utility, TPR / FPR / AUROC, latency of a defense")
    de.add_argument("--model", required=True)
    _add_attack_args(de)
    de.add_argument("--defense", default="cleansight", help="none, cleansight, blur, st, shrinkpad, jpeg, strip, "
                    "attention_entropy, scale_up")
    de.add_argument("--defense-settings", default=None, help="defense settings as a JSON object")
    de.add_argument("--calibration", default=None, help="a saved CleanSight (from `cleansight calibrate`): no refit")
    de.add_argument("--data", default="synthetic", help="'synthetic' (test split) or NAME:FOLDER")
    de.add_argument("--n", type=_positive_int, default=256, help="test samples (each also run with its trigger)")
    de.add_argument("--val", type=_positive_int, default=200, help="clean calibration samples")
    _add_run_args(de, batch_size=32)
    de.add_argument("--device", default=None)
    de.add_argument("--json", type=_out_file, default=None, help="also write the row to this file")
    de.set_defaults(fn=cmd_evaluate)

    tb2 = sub.add_parser("tables", help="attacks x defenses over the shipped tiny models (tables + manifests)")
    tb2.add_argument("--out", required=True, type=_out_dir, help="results folder")
    tb2.add_argument("--overwrite", action="store_true", help="replace tables of the same names in --out")
    tb2.add_argument("--models", type=_csv_names, default=list(TABLE_MODELS),
                     help="comma-separated attack models (tiny-llava/NAME or registry names)")
    tb2.add_argument("--defenses", type=_csv_names, default=list(TABLE_DEFENSES), help="comma-separated defense names")
    tb2.add_argument("--n", type=_positive_int, default=32, help="test samples per model (small default for CPU)")
    tb2.add_argument("--val", type=_positive_int, default=50, help="clean calibration samples")
    _add_run_args(tb2, batch_size=32)
    tb2.add_argument("--format", default="auto", choices=("auto", "parquet", "csv"))
    tb2.add_argument("--device", default=None)
    tb2.set_defaults(fn=cmd_tables)
    return parser


def _close_process_group() -> None:
    """After a command that ``accelerate launch`` started in several processes: wait for every process, then
    close the process group. A process that exits with the group still open (the others still writing their
    results) can abort at exit ("terminate called without an active exception"), which fails the launch."""
    import torch.distributed as dist  # here, not at the top: only a launched run gets this far with a group

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (a value the parser refuses, a :class:`CleanSightError`, a path that
    cannot be read or written) prints one line ``cleansight <command>: error: ...`` and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)

    prog = f"cleansight {args.command}"
    try:
        code = int(args.fn(args) or 0)
        _close_process_group()
        return code
    except CleanSightError as exc:
        message = " ".join(str(exc).split())   # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a user-supplied path that cannot be read or written (missing, a folder, no permission)
        print(f"{prog}: error: {exc.strerror or exc}: {exc.filename!r}" if exc.filename else f"{prog}: error: {exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
