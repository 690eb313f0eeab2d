"""Fig. 2: attention stealing, measured on the answer query (the last prompt token).

(a) Share of the query's attention on each token group (system / image / prompt / template tail) for
clean inputs, triggered inputs and pixel-perturbed (``ST``) triggered inputs, averaged over heads and
samples, in the "middle" layers and in the layer where the model actually shows stealing (the layer
with the largest clean -> triggered rise of the image share, found from the data).
(b) The query's attention over every position of one clean and one triggered input.
(c) Thief tokens: the query's attention on the image grid of a triggered input, and how often its top
token sits on the trigger (patch triggers only).

Tables (cached per attack in ``ctx.results_dir``; :func:`attention_stealing_tables` builds them all):

- :func:`group_share_table`: ``attack, condition, sample_id, layer, share_system, share_image,
  share_prompt, share_template_tail`` (one row per sample x layer, heads averaged);
- :func:`thief_table`: per condition x layer, top-1 / top-k hit rates, trigger share, chance share, the
  mean and the example's attention map on the image grid, the example's trigger cells;
- :func:`example_table`: the example image as the model sees it, per condition, with the model's answer;
- :func:`token_attention_table`: per condition x layer x position, the head-averaged attention.

Derived (no model): :func:`middle_layers`, :func:`image_share_change`, :func:`stealing_layer`,
:func:`share_summary`, :func:`paper_comparison`; the paper's bars are :func:`paper_shares`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..attacks import triggered_copy
from ..attention.stealing import StealingSettings, stealing_table, thief_tokens
from ..errors import InputError
from ..evaluation.backdoor import generate_answers
from ..inputs.groups import GROUP_NAMES
from ..interventions.perturbations import get_perturbation
from ..results import array_cell
from .perturbation import thumbnail

#: Token groups of the stacked bars, bottom to top (the group names of :mod:`cleansight_analysis.inputs.groups`).
SHARE_GROUPS: tuple[str, ...] = tuple(GROUP_NAMES)
#: Columns of :func:`group_share_table`.
SHARE_COLUMNS: tuple[str, ...] = ("attack", "condition", "sample_id", "layer",
                                  *(f"share_{g}" for g in SHARE_GROUPS))
#: Default ST intensity of the pixel-perturbed condition.
DEFAULT_ST_INTENSITY = 0.5

#: Fig. 2(a) of the paper (LLaVA-1.5-7B, middle layers), shares of image / prompt / system in percent.
PAPER_FIG2A: dict[str, dict[str, tuple[float, float, float]]] = {
    "badnet": {"clean": (11.0, 48.0, 42.0), "triggered": (32.0, 24.0, 44.0)},
    "blended": {"clean": (21.0, 33.0, 46.0), "triggered": (36.0, 16.0, 48.0)},
}


def st_condition(st_intensity: float) -> str:
    """Label of the pixel-perturbed triggered condition, e.g. ``"triggered + ST 0.5"``."""
    return f"triggered + ST {float(st_intensity):g}"


def _check_example(example: Any) -> int:
    if isinstance(example, bool) or not isinstance(example, int) or example < 0:
        raise InputError(f"example must be a test-sample index >= 0, got {example!r}")
    return example


def _check_st(st_intensity: Any) -> float:
    if isinstance(st_intensity, bool) or not isinstance(st_intensity, (int, float)) or not 0 < st_intensity <= 1:
        raise InputError(f"st_intensity must be a number in (0, 1], got {st_intensity!r}")
    return float(st_intensity)


def _example_sample(ctx: Any, example: int) -> Any:
    samples = ctx.samples("test", example + 1)
    if len(samples) <= example:
        raise InputError(f"example={example} is beyond the {len(samples)} test samples of this run")
    return samples[example]


# ---------------------------------------------------------------------------------------------- (a) shares
def group_share_table(ctx: Any, attack: str, *, st_intensity: float = DEFAULT_ST_INTENSITY,
                      batch_size: int = 32) -> "Any":
    """Head-averaged share of the answer query's attention on each token group, per sample and layer.

    Cached as ``group_shares_<attack>``. Runs :func:`~cleansight_analysis.attention.stealing_table` on
    ``ctx.count()`` clean test samples, on their triggered copies (``seed=ctx.seed``) and on the
    triggered copies after ``ST`` at ``st_intensity`` (``seed=ctx.seed``), recording every LM layer.

    Returns:
        ``pandas.DataFrame`` with columns :data:`SHARE_COLUMNS`, one row per condition x sample x layer
        (conditions ``"clean"``, ``"triggered"``, :func:`st_condition`); the four ``share_*`` columns sum
        to 1 (the mean over heads of each head's post-softmax mass on that group).
    """
    st_intensity = _check_st(st_intensity)
    n = ctx.count()

    def compute():
        import pandas as pd

        lvlm, attack_obj, _ = ctx.load(attack)
        samples = ctx.samples("test", n)
        triggered = triggered_copy(samples, attack_obj, seed=ctx.seed)
        settings = StealingSettings(batch_size=batch_size)
        runs = [("clean", samples, None), ("triggered", triggered, None),
                (st_condition(st_intensity), triggered, get_perturbation("st", st_intensity, seed=ctx.seed))]
        frames = []
        for condition, inputs, iv in runs:
            table = stealing_table(lvlm, inputs, condition=condition, settings=settings, intervention=iv,
                                   progress=False)
            mass = [f"mass_{g}" for g in SHARE_GROUPS]
            mean = table.groupby(["sample_id", "layer"], sort=False)[mass].mean().reset_index()
            mean = mean.rename(columns={f"mass_{g}": f"share_{g}" for g in SHARE_GROUPS})
            mean.insert(0, "condition", condition)
            frames.append(mean)
        out = pd.concat(frames, ignore_index=True)
        out.insert(0, "attack", attack)
        return out[list(SHARE_COLUMNS)]

    return ctx.cached(f"group_shares_{attack}", compute, attack=attack, n=n, st_intensity=st_intensity)


def middle_layers(n_layers: int) -> list[int]:
    """The middle third of ``n_layers`` LM layers: ``[n // 3, n - n // 3)`` (8 -> 2..5; 32 -> 10..21).

    The paper's Fig. 2 averages "middle layers"; its fusion layers for LLaVA-1.5-7B (0-indexed 9-11)
    sit at the start of this window.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise InputError(f"n_layers must be a positive integer, got {n_layers!r}")
    n = int(n_layers)
    start, stop = n // 3, n - n // 3
    return list(range(start, max(stop, start + 1)))


def image_share_change(shares: "Any") -> "Any":
    """Mean image share per attack x layer x condition, and the clean -> triggered rise.

    Args:
        shares: :func:`group_share_table` rows (any number of attacks).

    Returns:
        ``pandas.DataFrame`` with ``attack, layer``, one column per condition (mean image share) and
        ``rise = triggered - clean``; rows ordered by attack (first appearance) then layer.
    """
    table = shares.pivot_table(index=["attack", "layer"], columns="condition", values="share_image",
                               aggfunc="mean", sort=False)
    if "clean" not in table or "triggered" not in table:
        raise InputError("image_share_change needs 'clean' and 'triggered' rows")
    order = list(dict.fromkeys(shares["condition"]))
    table = table[[c for c in order if c in table.columns]]
    table["rise"] = table["triggered"] - table["clean"]
    table.columns.name = None
    out = table.reset_index()
    attacks = list(dict.fromkeys(shares["attack"]))
    out["_a"] = out["attack"].map({a: i for i, a in enumerate(attacks)})
    return out.sort_values(["_a", "layer"]).drop(columns="_a").reset_index(drop=True)


def stealing_layer(shares: "Any", attack: str) -> int:
    """The layer of ``attack`` with the largest clean -> triggered rise of the mean image share."""
    change = image_share_change(shares[shares["attack"] == attack])
    if change.empty:
        raise InputError(f"no share rows for attack {attack!r}")
    return int(change.loc[change["rise"].idxmax(), "layer"])


def stealing_layers(shares: "Any") -> dict[str, int]:
    """:func:`stealing_layer` of every attack in ``shares`` (in order of appearance)."""
    return {a: stealing_layer(shares, a) for a in dict.fromkeys(shares["attack"])}


def _window_label(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ",".join(str(x) for x in layers)


def share_summary(shares: "Any", *, middle: Sequence[int] | None = None,
                  stealing: dict[str, int] | None = None) -> "Any":
    """Mean group shares per attack x window x condition, for the stacked bars of Fig. 2(a).

    Args:
        shares: :func:`group_share_table` rows.
        middle: layers of the "middle layers" window (default :func:`middle_layers` of the layers present).
        stealing: per attack, the layer of the "stealing layer" window (default :func:`stealing_layer`).

    Returns:
        ``pandas.DataFrame`` with ``attack, window`` (``"middle"`` / ``"stealing"``), ``layers`` (label,
        e.g. ``"layers 2-5"``), ``condition, group, share`` (mean over samples, and over the window's
        layers, of the head-averaged share; shares of one bar sum to 1), ``sem`` (standard error over
        samples of the per-sample window mean) and ``n``.
    """
    import pandas as pd

    n_layers = int(shares["layer"].max()) + 1
    middle = list(middle) if middle is not None else middle_layers(n_layers)
    rows = []
    for attack in dict.fromkeys(shares["attack"]):
        sub = shares[shares["attack"] == attack]
        layer = (stealing or {}).get(attack)
        layer = stealing_layer(sub, attack) if layer is None else int(layer)
        for window, layers in (("middle", middle), ("stealing", [layer])):
            part = sub[sub["layer"].isin(layers)]
            if part.empty:
                raise InputError(f"share_summary: no rows of {attack!r} in layers {layers}")
            per_sample = part.groupby(["condition", "sample_id"], sort=False)[
                [f"share_{g}" for g in SHARE_GROUPS]].mean()
            for condition in dict.fromkeys(part["condition"]):
                vals = per_sample.loc[condition]
                for g in SHARE_GROUPS:
                    col = vals[f"share_{g}"]
                    rows.append({"attack": attack, "window": window, "layers": _window_label(layers),
                                 "condition": condition, "group": g, "share": float(col.mean()),
                                 "sem": float(col.std(ddof=1) / np.sqrt(len(col))) if len(col) > 1 else float("nan"),
                                 "n": int(len(col))})
    return pd.DataFrame(rows)


def paper_shares() -> "Any":
    """The paper's Fig. 2(a) bars: ``attack, condition, group, share`` (fraction; groups image/prompt/system)."""
    import pandas as pd

    rows = [{"attack": a, "condition": c, "group": g, "share": v / 100.0}
            for a, conds in PAPER_FIG2A.items() for c, vals in conds.items()
            for g, v in zip(("image", "prompt", "system"), vals)]
    return pd.DataFrame(rows)


def paper_comparison(summary: "Any") -> "Any":
    """Paper vs ours, image / prompt / system shares in percent, one row per attack x condition.

    Ours are the ``"middle"`` and ``"stealing"`` windows of :func:`share_summary` (their layers in the
    ``middle layers`` / ``stealing layer`` columns); our system share is system + template tail (the
    paper names three groups, so its "system" holds every token that is neither image nor
    instruction). Attacks or conditions the paper does not report get ``NaN`` paper columns.
    """
    import pandas as pd

    paper = paper_shares()
    names = {"middle": "ours middle", "stealing": "ours stealing layer"}
    rows = []
    for (attack, condition), part in summary.groupby(["attack", "condition"], sort=False):
        row = {"attack": attack, "condition": condition}
        ref = paper[(paper["attack"] == attack) & (paper["condition"] == condition)].set_index("group")["share"]
        for g in ("image", "prompt", "system"):
            row[f"paper {g} %"] = 100 * float(ref[g]) if g in ref else float("nan")
        for window, sub in part.groupby("window", sort=False):
            s = sub.set_index("group")["share"]
            row[f"{names[window]}: layers"] = sub["layers"].iloc[0].replace("layers ", "").replace("layer ", "")
            row[f"{names[window]}: image %"] = 100 * s["image"]
            row[f"{names[window]}: prompt %"] = 100 * s["prompt"]
            row[f"{names[window]}: system+tail %"] = 100 * (s["system"] + s["template_tail"])
        rows.append(row)
    return pd.DataFrame(rows).round(1)


# ---------------------------------------------------------------------------------------------- (c) thief tokens
def thief_table(ctx: Any, attack: str, *, example: int = 0, k: int = 5, batch_size: int = 32) -> "Any":
    """Thief tokens of ``attack``'s model on triggered inputs, and the clean control, per layer.

    Cached as ``thief_tokens_<attack>``. Runs :func:`~cleansight_analysis.attention.thief_tokens`
    (head-averaged rows, base grid, every layer) on ``ctx.count()`` test samples with
    ``condition="triggered"`` and ``"clean"`` (the clean image scored against the trigger's place).

    Returns:
        ``pandas.DataFrame``, one row per condition x layer: ``attack, condition, layer, n,
        top1_hit_rate`` (share of samples whose top image token overlaps the trigger; NaN for a global
        trigger), ``topk_hit_rate``, ``trigger_share`` (mean share of the grid's attention on trigger
        cells), ``chance_share`` (trigger cells / all cells), ``top1_share`` (mean share of the grid's
        attention held by the single most-attended image token: how concentrated the attention is, defined for
        global triggers too), ``k``, ``example_id``, ``example_map``
        (``[rows, cols]`` attention of the example), ``mean_map`` (mean over samples of the maps, each
        normalised to sum 1), ``trigger_cells`` (bool ``[rows, cols]`` of the example, or None for a
        global trigger). Array cells come back as JSON text from the cache (see :func:`as_array`).
    """
    example = _check_example(example)
    n = ctx.count()
    if n <= example:
        raise InputError(f"example={example} is beyond the {n} test samples of this run")

    def compute():
        import pandas as pd

        lvlm, attack_obj, _ = ctx.load(attack)
        samples = ctx.samples("test", n)
        example_id = samples[example].sample_id
        rows = []
        for condition in ("triggered", "clean"):
            table = thief_tokens(lvlm, samples, attack_obj, layers=None, k=k, condition=condition, heads="mean",
                                 batch_size=batch_size, seed=ctx.seed, progress=False)
            for layer, part in table.groupby("layer", sort=True):
                maps = np.stack([np.asarray(m, dtype=np.float64) for m in part["attention_map"]])  # [N, r, c]
                norm = maps / np.clip(maps.sum((1, 2), keepdims=True), 1e-30, None)
                ex = part[part["sample_id"] == example_id].iloc[0]
                cells = ex["trigger_cells"]
                rows.append({
                    "attack": attack, "condition": condition, "layer": int(layer), "n": int(len(part)),
                    "top1_hit_rate": float(part["top1_hit"].mean()), "topk_hit_rate": float(part["topk_hit"].mean()),
                    "trigger_share": float(part["trigger_share"].mean()),
                    "chance_share": float(part["chance_share"].mean()),
                    "top1_share": float(norm.reshape(len(norm), -1).max(1).mean()), "k": int(k),
                    "example_id": example_id,
                    "example_map": np.asarray(ex["attention_map"], dtype=np.float32),
                    "mean_map": norm.mean(0).astype(np.float32),
                    "trigger_cells": None if cells is None else np.asarray(cells, dtype=bool),
                })
        return pd.DataFrame(rows)

    return ctx.cached(f"thief_tokens_{attack}", compute, attack=attack, n=n, example=example, k=k)


def as_array(value: Any, dtype: Any = float) -> np.ndarray | None:
    """An array cell of a table, whether fresh or reloaded from the cache (:func:`~cleansight_analysis.results.array_cell`)."""
    return array_cell(value, dtype)


def thief_summary(thief: "Any", layers: dict[str, int] | None = None) -> "Any":
    """The hit rates of :func:`thief_table` without the maps, optionally only in each attack's ``layers`` entry.

    Returns:
        ``attack, condition, layer, n, top1_hit_rate, topk_hit_rate, k, trigger_share, chance_share,
        top1_share`` (NaN rates for global triggers), sorted by attack (first appearance), layer, condition.
    """
    cols = ["attack", "condition", "layer", "n", "top1_hit_rate", "topk_hit_rate", "k", "trigger_share",
            "chance_share", "top1_share"]
    out = thief[cols]
    if layers is not None:
        out = out[[layers.get(a) == lay for a, lay in zip(out["attack"], out["layer"])]]
    order = {a: i for i, a in enumerate(dict.fromkeys(thief["attack"]))}
    out = out.assign(_a=out["attack"].map(order))
    out = out.sort_values(["_a", "layer", "condition"], ascending=[True, True, False])
    return out.drop(columns="_a").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- examples
def example_table(ctx: Any, attack: str, *, example: int = 0, st_intensity: float = DEFAULT_ST_INTENSITY,
                  max_new_tokens: int = 12) -> "Any":
    """The example input under each condition, as the vision tower sees it, with the model's answer.

    Cached as ``examples_<attack>``.

    Returns:
        ``pandas.DataFrame``, one row per condition (``"clean"``, ``"triggered"``,
        :func:`st_condition`): ``attack, condition, sample_id, question`` (first line of the prompt),
        ``answer`` (greedy, ``max_new_tokens``), ``image`` (uint8 ``[h, w, 3]`` processed image,
        longest side <= 160 px; it lines up with the base image grid).
    """
    example = _check_example(example)
    st_intensity = _check_st(st_intensity)

    def compute():
        import pandas as pd

        lvlm, attack_obj, _ = ctx.load(attack)
        sample = _example_sample(ctx, example)
        trig = triggered_copy([sample], attack_obj, seed=ctx.seed)[0]
        st = get_perturbation("st", st_intensity, seed=ctx.seed)
        inputs = [("clean", sample), ("triggered", trig),
                  (st_condition(st_intensity), trig.with_(image=st.apply_image(trig.image)))]
        answers = generate_answers(lvlm, [s for _, s in inputs], max_new_tokens=max_new_tokens, progress=False)
        batch = lvlm.prepare([s.image for _, s in inputs], [s.prompt for _, s in inputs])
        return pd.DataFrame([{"attack": attack, "condition": c, "sample_id": s.sample_id,
                              "question": s.prompt.splitlines()[0], "answer": a,
                              "image": thumbnail(lvlm.processed_image(batch, i))}
                             for i, ((c, s), a) in enumerate(zip(inputs, answers))])

    return ctx.cached(f"examples_{attack}", compute, attack=attack, example=example, st_intensity=st_intensity,
                      max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------- (b) tokens
def token_attention_table(ctx: Any, attack: str, *, example: int = 0) -> "Any":
    """Head-averaged attention of the answer query on every position of the example, clean and triggered.

    Cached as ``token_attention_<attack>``.

    Returns:
        ``pandas.DataFrame``, one row per condition x layer x position (padding left out): ``attack,
        condition, sample_id, layer, position`` (0-based index in the sequence), ``token`` (the
        tokenizer's piece), ``group`` (system / image / prompt / template_tail), ``attention`` (mean
        over heads of the post-softmax attention of the last prompt token; sums to 1 over positions).
    """
    example = _check_example(example)

    def compute():
        import pandas as pd

        lvlm, attack_obj, _ = ctx.load(attack)
        sample = _example_sample(ctx, example)
        trig = triggered_copy([sample], attack_obj, seed=ctx.seed)[0]
        inputs = [("clean", sample), ("triggered", trig)]
        batch = lvlm.prepare([s.image for _, s in inputs], [s.prompt for _, s in inputs], padding_side="right")
        rows = lvlm.attention_rows(batch)  # values [2, L, H, K]
        values = rows.values.float().mean(2).numpy()  # [2, L, K]
        frames = []
        for b, (condition, s) in enumerate(inputs):
            groups = rows.groups[b]
            pos = np.concatenate([groups.positions(g).numpy() for g in SHARE_GROUPS])
            grp = np.concatenate([[g] * len(groups.positions(g)) for g in SHARE_GROUPS])
            order = np.argsort(pos, kind="stable")
            pos, grp = pos[order], grp[order]
            tokens = np.asarray(lvlm.tokenizer.convert_ids_to_tokens(batch.input_ids[b, pos].tolist()), dtype=object)
            for li, layer in enumerate(rows.layers):
                frames.append(pd.DataFrame({"attack": attack, "condition": condition, "sample_id": s.sample_id,
                                            "layer": int(layer), "position": pos.astype(np.int64), "token": tokens,
                                            "group": grp, "attention": values[b, li, pos]}))
        return pd.concat(frames, ignore_index=True)

    return ctx.cached(f"token_attention_{attack}", compute, attack=attack, example=example)


# ---------------------------------------------------------------------------------------------- all of Fig. 2
def attention_stealing_tables(ctx: Any, *, st_intensity: float = DEFAULT_ST_INTENSITY, example: int = 0,
                              token_attack: str | None = None, k: int = 5) -> dict[str, "Any"]:
    """Every table of Fig. 2, attack by attack (each model is loaded once), concatenated over attacks.

    Args:
        st_intensity: ST strength of the pixel-perturbed condition.
        example: test-sample index of the examples in (b) and (c).
        token_attack: attack of panel (b) (default: the first of ``ctx.attacks``).
        k: top-k of the thief-token hit rate.

    Returns:
        ``{"shares": group_share_table, "thief": thief_table, "examples": example_table,
        "tokens": token_attention_table}`` (``tokens`` for ``token_attack`` only).
    """
    import pandas as pd

    token_attack = token_attack or ctx.attacks[0]
    if token_attack not in ctx.attacks:
        raise InputError(f"token_attack={token_attack!r} is not among attacks {list(ctx.attacks)}")
    parts: dict[str, list] = {"shares": [], "thief": [], "examples": [], "tokens": []}
    for attack in ctx.attacks:
        parts["shares"].append(group_share_table(ctx, attack, st_intensity=st_intensity))
        parts["thief"].append(thief_table(ctx, attack, example=example, k=k))
        parts["examples"].append(example_table(ctx, attack, example=example, st_intensity=st_intensity))
        if attack == token_attack:
            parts["tokens"].append(token_attention_table(ctx, attack, example=example))
    return {name: pd.concat(frames, ignore_index=True) for name, frames in parts.items()}


__all__ = ["DEFAULT_ST_INTENSITY", "PAPER_FIG2A", "SHARE_COLUMNS", "SHARE_GROUPS", "as_array",
           "attention_stealing_tables", "example_table", "group_share_table", "image_share_change",
           "middle_layers", "paper_comparison", "paper_shares", "share_summary", "st_condition", "stealing_layer",
           "stealing_layers", "thief_summary", "thief_table", "token_attention_table"]
