"""Stealing features: from the answer query's attention rows to one vector per input.

One path for every caller (CleanSight, the layer selector, the detection sweeps, the separability
analyses):

1. **Group masses** (:func:`group_masses`): the query's post-softmax row of one layer ``[B, H, K]``
   (float32 as the model computed it) is summed per token group in float64:
   ``mass[b, h, g] = sum_k row[b, h, k] * member[b, k, g]`` with the groups
   :data:`~cleansight_analysis.inputs.groups.GROUP_NAMES` plus ``generated`` (keys written during
   decoding; 0 at prefill). Masses of a real query sum to 1.
2. **Image and text mass** (:func:`image_text_masses`): ``image = mass[image]``;
   ``text = sum of mass[g] for g in TEXT_GROUPS[text_keys]`` (+ ``generated``), added in that fixed order.
3. **Feature** (:func:`feature_values`), the named setting ``feature``:

   - ``"ratio"`` (the paper's ``S``): ``image / (text + eps)``, ``eps = 1e-12`` by default;
   - ``"log_ratio"``: ``log(image + log_eps) - log(text + log_eps)``, ``log_eps = 1e-6`` by default
     (masses below ~1e-6 are at the resolution of float32 attention sums, so they all read as "none";
     the value is bounded by ``|log log_eps| ~ 13.8``);
   - ``"masses"``: the two masses themselves, ``(image, text)``.

   :data:`FEATURE_WIDTH` gives the values per head (1, 1, 2).
4. **Vector** (:func:`stealing_features`): masses ``[N, L, H, G]`` -> ``[N, L * H * F]`` float64,
   layer-major, then head, then the feature's values.

Because steps 2-4 start from the float64 group masses, a table that stores the four group masses
(``mass_system, mass_image, mass_prompt, mass_template_tail``) gives bit-identical features to the
in-flight computation of CleanSight when the masses came from the same batches
(:func:`cleansight_analysis.detection.passes.sample_masses`).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..inputs.groups import GENERATED, GROUP_NAMES

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..inputs.batch import Batch

#: Readings of the ratio's denominator: ``"post_image"`` (every key after the image block, the authors'
#: code) or ``"instruction"`` (the prompt tokens only, the paper's text).
TEXT_KEYS: tuple[str, ...] = ("post_image", "instruction")
#: Token groups summed in the text mass under each ``text_keys`` setting.
TEXT_GROUPS: dict[str, tuple[str, ...]] = {
    "post_image": ("prompt", "template_tail"),
    "instruction": ("prompt",),
}
#: Groups of :func:`group_masses` (the prompt groups, then keys written during decoding).
MASS_GROUPS: tuple[str, ...] = (*GROUP_NAMES, GENERATED)
#: The detection features (see the module docstring).
FEATURES: tuple[str, ...] = ("ratio", "log_ratio", "masses")
#: Values per head of each feature.
FEATURE_WIDTH: dict[str, int] = {"ratio": 1, "log_ratio": 1, "masses": 2}
#: Defaults of the ratio's ``eps`` (the paper's) and of ``log_ratio``'s ``log_eps``.
RATIO_EPS = 1e-12
LOG_EPS = 1e-6
#: What ``feature`` and ``text_keys`` accept (the one wording of both rules).
FEATURE_RULE = (f"must be one of {FEATURES} ('ratio': image / (text + eps), the paper's; 'log_ratio': "
                "log(image + log_eps) - log(text + log_eps); 'masses': (image, text))")
TEXT_KEYS_RULE = (f"must be one of {TEXT_KEYS} ('post_image': instruction + template tail, the authors' code; "
                  "'instruction': prompt tokens only, the paper's text)")


def check_feature(feature: Any, owner: str) -> str:
    if not isinstance(feature, str) or feature not in FEATURES:
        raise InputError(f"{owner}: feature={feature!r} {FEATURE_RULE}")
    return feature


def check_text_keys(text_keys: Any, owner: str) -> str:
    if not isinstance(text_keys, str) or text_keys not in TEXT_KEYS:
        raise InputError(f"{owner}: text_keys={text_keys!r} {TEXT_KEYS_RULE}")
    return text_keys


def check_eps(value: Any, owner: str, name: str, *, positive: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (float(value) <= 0 if positive else float(value) < 0):
        raise InputError(f"{owner}: {name}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Rows -> group masses
# ---------------------------------------------------------------------------------------------


def membership(batch: "Batch", n_keys: int | None = None) -> torch.Tensor:
    """``[B, K, G]`` float64 one-hot group of every key (:data:`MASS_GROUPS`; keys at or after ``T`` are
    ``generated``; padding belongs to no group)."""
    k = batch.seq_len if n_keys is None else int(n_keys)
    return torch.stack([g.membership(k, generated=True) for g in batch.groups]).double()


def group_masses(rows: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Attention mass per group: rows ``[B, H, K]`` (any float dtype) and ``member`` ``[B, K', G]``
    (``K' >= K``; cut to ``K``) -> ``[B, H, G]`` float64."""
    k = rows.shape[-1]
    return torch.einsum("bhk,bkg->bhg", rows.double(), member[:, :k].to(rows.device))


def image_text_masses(mass: Any, text_keys: str = "post_image",
                      groups: Sequence[str] = MASS_GROUPS) -> tuple[Any, Any]:
    """``(image, text)`` masses ``[...]`` from group masses ``[..., G]`` (``G`` named by ``groups``;
    numpy or torch). The text mass adds the ``text_keys`` groups, then ``generated`` when present."""
    idx = {g: i for i, g in enumerate(groups)}
    text = mass[..., idx[TEXT_GROUPS[text_keys][0]]]
    for g in TEXT_GROUPS[text_keys][1:]:
        text = text + mass[..., idx[g]]
    if GENERATED in idx:
        text = text + mass[..., idx[GENERATED]]
    return mass[..., idx["image"]], text


def feature_values(image: Any, text: Any, feature: str = "ratio", *, eps: float = RATIO_EPS,
                   log_eps: float = LOG_EPS) -> Any:
    """The feature's values ``[..., F]`` from image and text masses ``[...]`` (numpy or torch)."""
    if isinstance(image, torch.Tensor):
        log, stack = torch.log, (lambda xs: torch.stack(xs, -1))
    else:
        image, text = np.asarray(image, dtype=np.float64), np.asarray(text, dtype=np.float64)
        log, stack = np.log, (lambda xs: np.stack(xs, -1))
    if feature == "ratio":
        return stack([image / (text + eps)])
    if feature == "log_ratio":
        return stack([log(image + log_eps) - log(text + log_eps)])
    if feature == "masses":
        return stack([image, text])
    raise InputError(f"feature={feature!r} must be one of {FEATURES}")


def stealing_features(mass: Any, feature: str = "ratio", text_keys: str = "post_image", *, eps: float = RATIO_EPS,
                      log_eps: float = LOG_EPS, groups: Sequence[str] = MASS_GROUPS) -> np.ndarray:
    """Feature vectors ``[N, L * H * F]`` float64 (layer-major, then head, then value) from group masses
    ``[N, L, H, G]`` (numpy or torch)."""
    if isinstance(mass, torch.Tensor):
        mass = mass.detach().cpu().double().numpy()
    mass = np.asarray(mass, dtype=np.float64)
    if mass.ndim != 4:
        raise InputError(f"stealing_features: expected masses [N, L, H, G], got shape {mass.shape}")
    image, text = image_text_masses(mass, text_keys, groups)
    values = feature_values(image, text, feature, eps=eps, log_eps=log_eps)  # [N, L, H, F]
    return values.reshape(len(mass), -1)


def feature_names(layers: Sequence[int], n_heads: int, feature: str) -> list[str]:
    """Names of the dimensions of :func:`stealing_features`: ``"L7.H3"`` (or ``"L7.H3.image"`` / ``.text``)."""
    tail = {"masses": (".image", ".text")}.get(feature, ("",))
    return [f"L{layer}.H{h}{t}" for layer in layers for h in range(n_heads) for t in tail]


# ---------------------------------------------------------------------------------------------
# Tables of group masses
# ---------------------------------------------------------------------------------------------

#: Mass columns of a stealing table, in :data:`GROUP_NAMES` order.
MASS_COLUMNS: tuple[str, ...] = tuple(f"mass_{g}" for g in GROUP_NAMES)


def table_masses(table: "pd.DataFrame", layers: Sequence[int] | None = None, *,
                 owner: str = "table_masses") -> tuple[list[str], list[int], np.ndarray]:
    """Group masses of a tidy stealing table: ``(sample_ids, layers, mass [N, L, H, 4])``.

    Samples keep their first-seen order; ``layers`` (default every layer of the table) ascending;
    the table must hold one row per sample x layer x head.
    """
    missing = [c for c in ("sample_id", "layer", "head", *MASS_COLUMNS) if c not in table.columns]
    if missing:
        raise InputError(f"{owner}: the table lacks column(s) {missing}; build it with detection_table / "
                         "stealing_table")
    all_layers = sorted(int(x) for x in table["layer"].unique())
    if layers is None:
        layers = all_layers
    else:
        layers = sorted({int(x) for x in layers})
        unknown = sorted(set(layers) - set(all_layers))
        if unknown:
            raise InputError(f"{owner}: layer(s) {unknown} are not in the table (layers: {all_layers})")
        table = table[table["layer"].isin(layers)]
    ids = list(dict.fromkeys(table["sample_id"].astype(str)))
    heads = sorted(int(x) for x in table["head"].unique())
    n, n_l, n_h = len(ids), len(layers), len(heads)
    if len(table) != n * n_l * n_h:
        raise InputError(f"{owner}: {len(table)} rows for {n} samples x {n_l} layers x {n_h} heads: missing or "
                         "duplicate rows")
    pos = {s: i for i, s in enumerate(ids)}
    si = table["sample_id"].astype(str).map(pos).to_numpy()
    li = np.searchsorted(np.asarray(layers), table["layer"].to_numpy())
    hi = np.searchsorted(np.asarray(heads), table["head"].to_numpy())
    out = np.full((n, n_l, n_h, len(MASS_COLUMNS)), np.nan)
    out[si, li, hi] = table[list(MASS_COLUMNS)].to_numpy(dtype=np.float64)
    if np.isnan(out).any():
        raise InputError(f"{owner}: some (sample, layer, head) cells are missing or NaN")
    return ids, layers, out


__all__ = ["FEATURES", "FEATURE_WIDTH", "LOG_EPS", "MASS_COLUMNS", "MASS_GROUPS", "RATIO_EPS", "TEXT_GROUPS",
           "TEXT_KEYS", "FEATURE_RULE", "TEXT_KEYS_RULE", "check_feature", "check_text_keys", "feature_names", "feature_values", "group_masses",
           "image_text_masses", "membership", "stealing_features", "table_masses"]
