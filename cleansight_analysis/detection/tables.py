"""Tidy tables of detection features, and features back from them (the detection sweeps' path).

:func:`mass_table` runs :func:`~.passes.sample_masses` (the forward passes CleanSight's ``fit`` runs: left
padding, consecutive batches) and writes one row per sample x layer x head with the four group masses and
the ratio, the columns of :data:`~cleansight_analysis.attention.stealing.STEALING_COLUMNS`.
:func:`table_features` turns such a table back into feature vectors with a :class:`~.detector.DetectorSettings`;
the masses are stored in float64, so features (and distances) from the table equal CleanSight's on the same
batches bit for bit. Tables without mass columns (hand-built ones) serve ``feature="ratio"`` from their
``ratio`` column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import InputError
from ..inputs.groups import GROUP_NAMES
from .detector import DetectorSettings
from .features import MASS_COLUMNS, MASS_GROUPS, RATIO_EPS, check_text_keys, feature_values, image_text_masses, table_masses
from .passes import sample_masses
from ..data.base import Sample
from ..models.hooked import HookedLVLM
from ..data.base import check_samples

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd



def mass_table(model: "HookedLVLM", samples: Sequence["Sample"], *, condition: str, layers: Sequence[int] | None = None,
               batch_size: int = 16, text_keys: str = "post_image", eps: float = RATIO_EPS,
               progress: bool = False) -> "pd.DataFrame":
    """``sample_id, condition, layer, head, mass_system, mass_image, mass_prompt, mass_template_tail, ratio``.

    Args:
        samples: the inputs (``sample_id`` must be unique; empty ids become ``"#<index>"``).
        layers: LM layers (default all).
        batch_size: samples per forward pass (CleanSight's ``batch_size`` gives CleanSight's batches).
        text_keys, eps: the ``ratio`` column's denominator and ``eps``.
    """
    import pandas as pd


    samples = check_samples(samples, "mass_table")
    text_keys = check_text_keys(text_keys, "mass_table")
    ids = [str(s.sample_id) if s.sample_id else f"#{i}" for i, s in enumerate(samples)]
    if len(set(ids)) != len(ids):
        raise InputError(f"mass_table: sample ids repeat within condition {condition!r}; ids must be unique")
    layers = sorted(set(model.check_layers(layers)))
    mass = sample_masses(model, samples, layers, batch_size=batch_size, progress=progress,
                         desc=f"detection features ({condition})")[0]                   # [N, L, H, G]
    mass = mass[..., :len(GROUP_NAMES)]  # the generated group is empty at prefill
    n, n_l, n_h, _ = mass.shape
    image, text = image_text_masses(mass, text_keys, GROUP_NAMES)
    per = n_l * n_h
    frame = pd.DataFrame({
        "sample_id": np.repeat(np.asarray(ids, dtype=object), per),
        "condition": np.full(n * per, condition, dtype=object),
        "layer": np.tile(np.repeat(np.asarray(layers, dtype=np.int64), n_h), n),
        "head": np.tile(np.arange(n_h, dtype=np.int64), n * n_l),
        **{c: mass[..., i].reshape(-1) for i, c in enumerate(MASS_COLUMNS)},
        "ratio": feature_values(image, text, "ratio", eps=eps)[..., 0].reshape(-1),
    })
    frame.attrs["stealing"] = {"text_keys": text_keys, "layers": list(layers), "batch_size": int(batch_size),
                               "eps": float(eps), "query": "last", "padding": "left",
                               "model": getattr(model, "name", None)}
    return frame


def table_features(table: "pd.DataFrame", condition: str | None = None, layers: Sequence[int] | None = None,
                   settings: DetectorSettings | None = None, *, owner: str = "table_features") -> tuple[list[str], np.ndarray]:
    """``(sample_ids, features [N, |layers| * H * F])`` of the rows of ``condition`` (all rows when None).

    Samples keep their first-seen order; layers ascending (default every layer of the table). With the
    ``mass_*`` columns every feature is computed from the masses (:meth:`DetectorSettings.features`);
    without them only ``feature="ratio"`` is available, read from the ``ratio`` column.
    """
    settings = settings or DetectorSettings()
    for col in ("sample_id", "layer", "head"):
        if col not in table.columns:
            raise InputError(f"{owner}: the table lacks column {col!r}; build it with detection_table")
    sub = table
    if condition is not None:
        if "condition" not in table.columns:
            raise InputError(f"{owner}: the table lacks column 'condition'; build it with detection_table")
        sub = table[table["condition"] == condition]
        if sub.empty:
            raise InputError(f"{owner}: no {condition!r} rows; conditions: {sorted(map(str, table['condition'].unique()))}")
    if all(c in sub.columns for c in MASS_COLUMNS):
        ids, _, mass = table_masses(sub, layers, owner=owner)
        return ids, settings.features(mass, groups=MASS_GROUPS[:len(MASS_COLUMNS)])
    if settings.feature != "ratio" or "ratio" not in sub.columns:
        raise InputError(f"{owner}: feature={settings.feature!r} needs the columns {list(MASS_COLUMNS)}; build the "
                         "table with detection_table (or use feature='ratio' with a 'ratio' column)")
    # the ratio goes through table_masses in the image slot; a table may carry some mass columns (e.g.
    # mass_image alone) without all of them, and those must not collide with it
    ratio_only = sub.drop(columns=[c for c in MASS_COLUMNS if c in sub.columns])
    renamed = ratio_only.rename(columns={"ratio": "mass_image"}).assign(mass_system=0.0, mass_prompt=0.0,
                                                                         mass_template_tail=0.0)
    ids, _, mass = table_masses(renamed, layers, owner=owner)
    return ids, mass[..., MASS_COLUMNS.index("mass_image")].reshape(len(ids), -1)


__all__ = ["mass_table", "table_features"]
