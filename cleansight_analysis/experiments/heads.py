"""Per-head analysis (Fig. 9): which attention heads carry the backdoor?

Two complementary views, both per LM layer x head, on ``hook_z`` (the input of ``o_proj`` split by head):

- **ablation** (:func:`head_ablation_table`): one head's output is zeroed (or set to its mean) at every
  position, at prefill and every decode step; ASR on triggered inputs and clean accuracy (the one scorer:
  exact match on short answers) on clean inputs are measured with greedy decoding
  (:func:`cleansight_analysis.evaluation.intervention_sweeps.head_sweep`). A head whose ablation drops ASR
  is *necessary* for the backdoor.
- **activation patching** (:func:`head_patching_table`): one head's ``hook_z`` from a source run is
  copied into a destination run of the same prompt (:func:`cleansight_analysis.interventions.patch_heads`);
  ``restored`` is the share of the target first token's log-prob gap between the two runs that this one
  head moves. ``triggered->clean`` (source triggered, destination clean): which heads suffice to carry
  the trigger's effect into a clean run; ``clean->triggered``: which heads, made clean, remove it.

Each head costs a full generation (ablation) or a forward pass (patching), so a large model is swept over
a window of layers: :func:`default_head_layers` (every layer up to ``max_layers``, else ``max_layers``
evenly spaced layers from the first to the last).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..attacks import triggered_copy
from ..errors import InputError
from ..evaluation.intervention_sweeps import head_sweep
from ..interventions.heads import patch_heads

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .context import FigureContext

#: Patching directions (``source->destination``).
DIRECTIONS: tuple[str, ...] = ("triggered->clean", "clean->triggered")


def default_head_layers(n_layers: int, max_layers: int = 8) -> list[int]:
    """Layers to sweep: all ``n_layers`` when there are at most ``max_layers``, else ``max_layers`` layers
    evenly spaced from 0 to ``n_layers - 1`` (first and last always included).

    >>> default_head_layers(8)
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> default_head_layers(32)
    [0, 4, 9, 13, 18, 22, 27, 31]
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise InputError(f"default_head_layers: n_layers={n_layers!r} must be a positive int")
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
        raise InputError(f"default_head_layers: max_layers={max_layers!r} must be a positive int")
    if n_layers <= max_layers:
        return list(range(n_layers))
    if max_layers == 1:
        return [n_layers - 1]
    return sorted({int(x) for x in np.round(np.linspace(0, n_layers - 1, max_layers))})


#: Layer window of smoke runs (the last layer only).
SMOKE_MAX_LAYERS = 1


def _window(ctx: "FigureContext", max_layers: int) -> int:
    return min(max_layers, SMOKE_MAX_LAYERS) if ctx.smoke else max_layers


def _layers(model: Any, layers: Sequence[int] | None, max_layers: int) -> list[int]:
    if layers is None:
        return default_head_layers(int(model.n_layers), max_layers)
    return model.check_layers(list(layers))


def _layers_key(layers: Sequence[int] | None, max_layers: int) -> Any:
    return list(layers) if layers is not None else f"default(max_layers={max_layers})"


def head_ablation_table(ctx: "FigureContext", *, layers: Sequence[int] | None = None, max_layers: int = 8,
                        method: str = "zero", max_new_tokens: int = 12, batch_size: int = 32) -> "pd.DataFrame":
    """ASR and clean accuracy with one head ablated at a time, per attack (cached).

    Args:
        ctx: the notebook's context (``ctx.count()`` clean test samples and their triggered copies).
        layers: LM layers whose heads are swept; default :func:`default_head_layers` of the model.
        max_layers: window size of the default (smoke runs: at most :data:`SMOKE_MAX_LAYERS`).
        method: ``"zero"`` or ``"mean"`` ablation.

    Returns:
        :func:`~cleansight_analysis.evaluation.intervention_sweeps.head_sweep` rows plus ``attack``: one baseline row
        (``layer = head = -1``) then ``layer, head, kind, method, asr, clean_acc, asr_drop, clean_drop, n``.
    """
    import pandas as pd

    max_layers = _window(ctx, max_layers)

    def compute() -> pd.DataFrame:
        samples = ctx.samples("test")
        parts = []
        for attack_name in ctx.attacks:
            model, attack, _ = ctx.load(attack_name)
            frame = head_sweep(model, samples, attack, kind="ablate", method=method,
                               layers=_layers(model, layers, max_layers), max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=not ctx.smoke)
            frame.insert(0, "attack", attack_name)
            parts.append(frame)
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("head_ablation", compute, layers=_layers_key(layers, max_layers), method=method,
                      max_new_tokens=max_new_tokens)


def head_patching_table(ctx: "FigureContext", *, directions: Sequence[str] = ("triggered->clean",),
                        layers: Sequence[int] | None = None, max_layers: int = 8,
                        batch_size: int = 32) -> "pd.DataFrame":
    """Activation patching of each head's ``hook_z`` between clean and triggered runs, per attack (cached).

    The measured token is the first token of the attack's target phrase at the answer query. Layers as in
    :func:`head_ablation_table`.

    Returns:
        :func:`~cleansight_analysis.interventions.patch_heads` rows plus ``attack``: ``direction, layer,
        head, logprob_target, logprob_unpatched, logprob_source, delta, restored, target_token_id, n``
        (one row per direction and head; ``restored`` is the share of the log-prob gap moved).
    """
    import pandas as pd

    max_layers = _window(ctx, max_layers)
    directions = list(directions)
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise InputError(f"head_patching_table: directions must be among {DIRECTIONS}, got {directions!r}")

    def compute() -> pd.DataFrame:
        clean = ctx.samples("test")
        parts = []
        for attack_name in ctx.attacks:
            model, attack, _ = ctx.load(attack_name)
            trig = triggered_copy(clean, attack, seed=ctx.seed)
            runs = {"clean": clean, "triggered": trig}
            target = getattr(attack, "target", None) or "you have been hacked lol"
            for direction in directions:
                source, dest = direction.split("->")
                frame = patch_heads(model, runs[source], runs[dest], target=target,
                                    layers=_layers(model, layers, max_layers), direction=direction,
                                    batch_size=batch_size, progress=not ctx.smoke)
                frame.insert(0, "attack", attack_name)
                parts.append(frame)
        return pd.concat(parts, ignore_index=True)

    return ctx.cached("head_patching", compute, directions=directions, layers=_layers_key(layers, max_layers))


def top_heads(ablation: "pd.DataFrame", patching: "pd.DataFrame | None" = None, k: int = 3) -> "pd.DataFrame":
    """The ``k`` heads per attack with the lowest ASR when ablated and (with ``patching``) the ``k`` with the
    largest ``restored`` share per direction: ``attack, view, rank, head (e.g. "L0H4"), value, clean_acc``."""
    import pandas as pd

    rows = []
    heads = ablation[ablation["layer"] >= 0]
    for attack, sub in heads.groupby("attack", sort=False):
        for rank, (_, r) in enumerate(sub.sort_values(["asr", "clean_drop"]).head(k).iterrows(), 1):
            rows.append({"attack": attack, "view": "ablation: ASR", "rank": rank,
                         "head": f"L{int(r.layer)}H{int(r['head'])}", "value": float(r.asr),
                         "clean_acc": float(r.clean_acc)})
    if patching is not None:
        ph = patching[patching["layer"] >= 0]
        for (attack, direction), sub in ph.groupby(["attack", "direction"], sort=False):
            for rank, (_, r) in enumerate(sub.sort_values("restored", ascending=False).head(k).iterrows(), 1):
                rows.append({"attack": attack, "view": f"patching {direction}: restored", "rank": rank,
                             "head": f"L{int(r.layer)}H{int(r['head'])}", "value": float(r.restored),
                             "clean_acc": float("nan")})
    return pd.DataFrame(rows, columns=["attack", "view", "rank", "head", "value", "clean_acc"])


__all__ = ["DIRECTIONS", "SMOKE_MAX_LAYERS", "default_head_layers", "head_ablation_table", "head_patching_table",
           "top_heads"]
