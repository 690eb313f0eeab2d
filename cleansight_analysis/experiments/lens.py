"""Fig. 7: logit lens of the answer query for clean, poisoned and poisoned + CleanSight inputs.

At every LM layer the residual stream of the answer query (last prompt token) is decoded with the
model's own final norm and unembedding (:func:`cleansight_analysis.interventions.logit_lens`), giving
``p_correct`` (first token of the reference answer) and ``p_target`` (first token of the attack target).
The layer where the two curves of poisoned inputs part from the clean ones is where the trigger starts
to act.

The poisoned + CleanSight curve applies the fitted defense's pruning to every triggered input (an oracle
detector): ``Omega`` = image keys whose attention from the answer query exceeds the calibrated ``tau`` in
any head of ``l_e`` (:func:`~cleansight_analysis.detection.pruning.attention_pruning_positions`), masked
before the softmax (:func:`~cleansight_analysis.detection.masking.key_mask_hooks`) from ``l_e`` on
(CleanSight's prefill mask for every scope but ``"all_layers"``) or in every layer (``"all_layers"``,
which CleanSight runs as detect-then-generate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..detection.masking import key_mask_hooks
from ..detection.pruning import attention_pruning_positions
from ..errors import InputError
from ..models.intervention import Intervention
from ..interventions.logit_lens import logit_lens
from .pruning import FIT_BATCH, fit_cleansight

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .context import FigureContext

#: Display names of the lens conditions, in plotting order.
CONDITIONS: dict[str, str] = {"clean": "clean", "triggered": "poisoned",
                              "reference": "poisoned + CleanSight",
                              "all_layers": "poisoned + CleanSight (mask every layer)"}
#: Columns of :func:`logit_lens_table`.
COLUMNS: tuple[str, ...] = ("attack", "condition", "sample", "sample_id", "layer", "p_correct", "p_target", "diff",
                            "n_pruned", "pruning_layer", "mask_from_layer", "tau", "n")


class CleanSightPruning(Intervention):
    """An intervention (hooks only) that prunes every input the way a fitted CleanSight prunes a flagged one.

    For each prepared batch: ``Omega`` per sample at the defense's last detection layer with its
    calibrated tau (one extra forward pass to read the attention), then key masks from ``l_e`` on
    (``mask_scope != "all_layers"``) or from layer 0. The number of keys pruned per sample is
    appended to :attr:`pruned` (batch order).

    Args:
        defense: a fitted CleanSight.
        scope: override of the defense's ``mask_scope`` (``"all_layers"`` masks from layer 0).
        tau: override of the calibrated tau.
    """

    domain = "attention"

    def __init__(self, defense: Any, scope: str | None = None, tau: float | None = None):
        cal = getattr(defense, "calibration", None)
        if cal is None:
            raise InputError("CleanSightPruning: the defense is not fitted")
        self.layer = int(list(cal.layers)[-1])
        self.tau = float(cal.tau if tau is None else tau)
        self.scope = scope or defense.config.mask_scope
        self.pruned: list[int] = []
        self.name = "cleansight" if self.scope != "all_layers" else "cleansight_all_layers"

    def mask_from(self) -> int:
        return 0 if self.scope == "all_layers" else self.layer

    def hooks(self, model: Any, batch: Any) -> list:
        positions = attention_pruning_positions(model, batch, self.layer, self.tau)
        self.pruned += [int(len(p)) for p in positions]
        return key_mask_hooks(model, positions, self.mask_from())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "layer": self.layer, "tau": self.tau, "scope": self.scope}


def lens_with_pruning(model: Any, attack: Any, samples: Sequence[Any], defense: Any, *,
                      scopes: Sequence[str] = ("reference", "all_layers"), batch_size: int = 32) -> "pd.DataFrame":
    """Logit-lens rows for clean, poisoned and poisoned + CleanSight pruning (one condition per scope).

    Returns:
        ``condition`` (``clean``, ``triggered``, or the scope name for pruned triggered inputs),
        ``sample, sample_id, layer, p_correct, p_target, diff, n_pruned`` (keys masked; 0 for clean and
        triggered), ``pruning_layer`` (``l_e``), ``mask_from_layer`` (first masked layer; -1 unpruned),
        ``tau``.
    """
    import pandas as pd

    if not scopes:
        raise InputError("lens_with_pruning: give at least one mask scope")
    parts = []
    for i, scope in enumerate(scopes):
        pruning = CleanSightPruning(defense, scope=scope)
        frame = logit_lens(model, samples, attack, intervention=pruning, batch_size=batch_size)
        pruned_name = f"triggered+{pruning.name}"
        keep = frame["condition"] == pruned_name
        if i > 0:  # clean and triggered rows are the same for every scope
            frame = frame[keep].copy()
            keep = frame["condition"] == pruned_name
        frame["n_pruned"] = 0
        frame.loc[keep, "n_pruned"] = frame.loc[keep, "sample"].map(dict(enumerate(pruning.pruned))).to_numpy()
        frame["pruning_layer"] = pruning.layer
        frame["mask_from_layer"] = -1
        frame.loc[keep, "mask_from_layer"] = pruning.mask_from()
        frame["tau"] = pruning.tau
        frame.loc[keep, "condition"] = scope
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def logit_lens_table(ctx: "FigureContext", *, n_val: int = 16, scopes: Sequence[str] = ("reference", "all_layers"),
                     batch_size: int = 32) -> "pd.DataFrame":
    """Fig. 7 table (cached): per attack, sample, layer and condition the lens probabilities.

    CleanSight is fitted (default settings) on ``ctx.count(n_val)`` clean calibration samples of each
    attack's model (the same fit as :func:`~cleansight_analysis.experiments.pruning.pruning_threshold_table`
    with the same ``n_val``, so ``l_e`` and tau match Fig. 6's calibrated star); ``ctx.count()`` test
    samples and their triggered copies are read.

    Returns:
        DataFrame with :data:`COLUMNS` (``condition`` in ``clean``, ``triggered`` and ``scopes``).
    """
    import pandas as pd

    scopes = list(scopes)

    def compute() -> pd.DataFrame:
        test, val = ctx.samples("test"), ctx.samples("calibration", n_val)
        parts = []
        for attack_name in ctx.attacks:
            model, attack, _ = ctx.load(attack_name)
            defense = fit_cleansight(model, val, batch_size=FIT_BATCH)
            frame = lens_with_pruning(model, attack, test, defense, scopes=scopes, batch_size=batch_size)
            frame["attack"] = attack_name
            frame["n"] = len(test)
            parts.append(frame)
        return pd.concat(parts, ignore_index=True)[list(COLUMNS)]

    return ctx.cached("logit_lens", compute, n_val=ctx.count(n_val), scopes=scopes)


def lens_summary(table: "pd.DataFrame") -> "pd.DataFrame":
    """Mean ``p_correct``, ``p_target`` and ``diff`` per attack, condition and layer (wide enough to print)."""
    _need(table, ("attack", "condition", "layer", "p_correct", "p_target", "diff"), "lens_summary")
    out = (table.groupby(["attack", "condition", "layer"], sort=False)[["p_correct", "p_target", "diff"]]
           .mean().reset_index())
    return out


def divergence_layer(table: "pd.DataFrame", threshold: float = 0.1) -> "pd.DataFrame":
    """Per attack: the first layer where the mean ``diff`` of poisoned inputs is below the clean one by more
    than ``threshold`` (the layer where the trigger starts to act), and the last-layer mean ``diff`` of every
    condition. ``first_divergent_layer`` is -1 when the curves never part."""
    import pandas as pd

    means = lens_summary(table)
    rows = []
    for attack, sub in means.groupby("attack", sort=False):
        wide = sub.pivot(index="layer", columns="condition", values="diff").sort_index()
        row: dict[str, Any] = {"attack": attack}
        if "clean" in wide and "triggered" in wide:
            gap = wide["clean"] - wide["triggered"]
            over = gap[gap > threshold]
            row["first_divergent_layer"] = int(over.index[0]) if len(over) else -1
        last = wide.iloc[-1]
        for cond in wide.columns:
            row[f"last_layer_diff[{CONDITIONS.get(cond, cond)}]"] = float(last[cond])
        rows.append(row)
    return pd.DataFrame(rows)


def _need(table: Any, columns: Sequence[str], owner: str) -> None:
    missing = [c for c in columns if c not in getattr(table, "columns", [])]
    if missing:
        raise InputError(f"{owner}: the table lacks column(s) {missing}")


__all__ = ["COLUMNS", "CONDITIONS", "CleanSightPruning", "divergence_layer", "lens_summary", "lens_with_pruning",
           "logit_lens_table"]
