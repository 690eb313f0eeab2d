"""Attention stealing: how much of the answer query's attention the image takes from the text.

For layer ``l`` and head ``h`` the paper's score (``docs/method.md#score``) is

    S^{l,h} = sum_{j in I_vis} alpha^{l,h}_{q,j} / (sum_{j in text keys} alpha^{l,h}_{q,j} + eps)

with ``q`` the last prompt token. Which keys count as text is ambiguous between the sources
(``docs/method.md#token-groups``): the paper's text says the instruction ``I_prm``; the authors' code divides by every key
after the image block. :class:`StealingSettings.text_keys` names the choice:

- ``"post_image"`` (default, the authors' code): instruction + template tail (``prompt`` +
  ``template_tail`` token groups, i.e. every token after the image block);
- ``"instruction"`` (the paper's text): the ``prompt`` group only.

Functions here run batched forward passes that keep only the query rows (``HookedLVLM.attention_rows``
with early exit; never ``output_attentions`` and never a ``[L, H, T, T]`` pattern) and return tidy
``pandas`` tables:

- :func:`stealing_table` / :func:`stealing_tables`: per-group attention masses and the ratio, one
  row per sample x layer x head;
- :func:`thief_tokens`: which image tokens take the attention (per-token attention laid out on the
  image grid, top-k tokens) and whether they sit on the trigger (localisation scores);
- :func:`attention_grid`, :func:`thief_map`, :func:`trigger_grid`: the ``[rows, cols]`` maps for plots.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Sequence

import numpy as np
import torch
from pydantic import BeforeValidator

from PIL import Image
from tqdm.auto import tqdm

from ..attacks import triggered_copy
from ..attacks.base import Attack
from ..data.base import Sample, check_samples
from ..detection.detector import EpsSetting, TextKeysSetting
from ..detection.features import TEXT_GROUPS, feature_values, image_text_masses
from ..errors import InputError
from ..inputs.groups import GROUP_NAMES
from ..inputs.images import to_rgb_image
from ..models.hooked import HookedLVLM
from ..models.intervention import Intervention, NoIntervention
from ..models.rows import AttentionRows
from ..settings import PositiveInt, settings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


# TEXT_KEYS (readings of the ratio's denominator) and TEXT_GROUPS (the groups summed under each) come from
# the detector core, cleansight_analysis.detection.features.
#: Columns of :func:`stealing_table`, in order.
STEALING_COLUMNS: tuple[str, ...] = (
    "sample_id", "condition", "layer", "head", "mass_system", "mass_image", "mass_prompt",
    "mass_template_tail", "ratio",
)
#: ``head`` value of head-averaged rows in :func:`thief_tokens`.
HEAD_MEAN = -1
#: Which heads :func:`thief_tokens` reports.
THIEF_HEADS: tuple[str, ...] = ("mean", "each", "both")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_layers_arg(layers: Any, owner: str) -> tuple[int, ...] | None:
    """Type-check a ``layers`` argument (range is checked against the model later)."""
    if layers is None:
        return None
    if isinstance(layers, torch.Tensor):
        layers = layers.tolist()
    if _is_int(layers):
        return (int(layers),)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InputError(f"{owner}: layers={layers!r} must be None (all layers), an int or a sequence of ints")
    out = tuple(layers)
    if not out:
        raise InputError(f"{owner}: layers is empty; pass None for every layer")
    bad = [x for x in out if not _is_int(x)]
    if bad:
        raise InputError(f"{owner}: layers must be ints, got {bad!r}")
    return tuple(int(x) for x in out)


def _check_batch_size(batch_size: Any, owner: str) -> int:
    if not _is_int(batch_size) or batch_size < 1:
        raise InputError(f"{owner}: batch_size={batch_size!r} must be an int >= 1")
    return int(batch_size)


@settings
class StealingSettings:
    """How :func:`stealing_table` computes the attention-stealing ratio.

    Attributes:
        text_keys: denominator of the ratio. ``"post_image"`` (default; the authors' code): every key
            after the image block, i.e. the ``prompt`` and ``template_tail`` groups. ``"instruction"``
            (the paper's text, ``I_prm``): the ``prompt`` group only.
        layers: LM layers to record (``None`` = all; negative indices count from the end).
        batch_size: samples per forward pass.
        eps: added to the denominator (the paper's ``1e-12``); must be finite and ``>= 0``.
    """

    text_keys: TextKeysSetting = "post_image"
    layers: Annotated[Any, BeforeValidator(lambda v: _check_layers_arg(v, "StealingSettings"))] = None
    batch_size: PositiveInt = 32
    eps: EpsSetting = 1e-12

    @property
    def text_groups(self) -> tuple[str, ...]:
        """Token groups summed in the denominator."""
        return TEXT_GROUPS[self.text_keys]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _check_samples(samples: Any, owner: str) -> list["Sample"]:
    return check_samples(samples, owner)


def _sample_ids(samples: Sequence["Sample"], owner: str) -> list[str]:
    """``sample_id`` of each sample (``"#<index>"`` when empty); duplicates are an error."""
    ids = [str(s.sample_id) if s.sample_id else f"#{i}" for i, s in enumerate(samples)]
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in seen:
            raise InputError(f"{owner}: samples[{seen[sid]}] and samples[{i}] share sample_id {sid!r}; "
                             "ids must be unique within one condition")
        seen[sid] = i
    return ids


def _check_intervention(intervention: Any, owner: str) -> "Intervention":
    if intervention is None:
        return NoIntervention()
    if not isinstance(intervention, Intervention):
        raise InputError(f"{owner}: intervention must be a cleansight_analysis.interventions.Intervention or "
                         f"None, got {type(intervention).__name__}")
    return intervention


def _check_condition(condition: Any, owner: str) -> str:
    if not isinstance(condition, str) or not condition:
        raise InputError(f"{owner}: condition must be a non-empty string label, got {condition!r}")
    return condition


def _images_of(sample: "Sample", index: int, intervention: "Intervention") -> Any:
    """The sample's image(s) as RGB PIL images with the intervention's pixel transform applied."""
    return intervention.transform(sample.image, where=f"samples[{index}].image")


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return iterable

    return tqdm(iterable, total=total, desc=desc, mininterval=2.0)


def _batched_rows(model: "HookedLVLM", images: list[Any], prompts: list[str], layers: list[int], batch_size: int,
                  intervention: "Intervention", *, desc: str, progress: bool) -> Iterable["AttentionRows"]:
    """Yield :class:`AttentionRows` (``values [b, L, H, K]``) of the last prompt token, batch by batch.

    Right padding keeps every sample's positions equal to its unpadded positions, so a batched row
    equals the batch-size-1 row up to float rounding.
    """
    starts = range(0, len(images), batch_size)
    for s in _progress(starts, len(starts), desc, progress):
        batch = model.prepare(images[s:s + batch_size], prompts[s:s + batch_size], padding_side="right")
        hooks = list(intervention.hooks(model, batch))
        yield model.attention_rows(batch, layers=layers, query="last", hooks=hooks)


# ---------------------------------------------------------------------------------------------
# Stealing tables
# ---------------------------------------------------------------------------------------------


def ratio_from_mass(mass: torch.Tensor | np.ndarray, settings: StealingSettings | None = None) -> Any:
    """The stealing ratio from per-group masses ``[..., G]`` (``G`` in :data:`GROUP_NAMES` order).

    Returns ``[...]``: ``mass[image] / (sum of mass over settings.text_groups + settings.eps)``, the detector
    core's ``feature="ratio"`` (:func:`cleansight_analysis.detection.features.feature_values`).
    """
    settings = settings or StealingSettings()
    image, text = image_text_masses(mass, settings.text_keys, GROUP_NAMES)
    return feature_values(image, text, "ratio", eps=settings.eps)[..., 0]


def stealing_table(model: "HookedLVLM", samples: Sequence["Sample"], *, condition: str = "clean",
                   settings: StealingSettings | None = None, intervention: "Intervention | None" = None,
                   progress: bool = True) -> "pd.DataFrame":
    """Per-group attention masses and the stealing ratio of the last prompt token.

    Args:
        model: the hooked LVLM.
        samples: the inputs (image and prompt of each :class:`~cleansight_analysis.data.base.Sample`);
            ``sample_id`` must be unique (empty ids become ``"#<index>"``).
        condition: label written in the ``condition`` column (e.g. ``"clean"``, ``"triggered"``).
        settings: :class:`StealingSettings` (denominator, layers, batch size, eps).
        intervention: optional :class:`~cleansight_analysis.interventions.Intervention`: its
            ``apply_image`` transforms each image and its ``hooks(model, batch)`` are active during
            the forward pass.
        progress: show a progress bar.

    Returns:
        ``pandas.DataFrame`` with one row per sample x layer x head (samples in input order, then
        layers in the order asked, then heads) and the columns :data:`STEALING_COLUMNS`:
        ``mass_<group>`` is the attention of the query on each token group (the four sum to 1) and
        ``ratio = mass_image / (text mass + eps)`` with the text mass given by ``settings.text_keys``.
        ``frame.attrs["stealing"]`` records the settings, the layers, the model and the intervention.
    """
    import pandas as pd

    owner = "stealing_table"
    if settings is None:
        settings = StealingSettings()
    elif not isinstance(settings, StealingSettings):
        raise InputError(f"{owner}: settings must be a StealingSettings, got {type(settings).__name__}")
    condition = _check_condition(condition, owner)
    samples = _check_samples(samples, owner)
    ids = _sample_ids(samples, owner)
    intervention = _check_intervention(intervention, owner)
    layers = model.check_layers(settings.layers)

    images = [_images_of(s, i, intervention) for i, s in enumerate(samples)]
    prompts = [s.prompt for s in samples]
    masses = [rows.group_mass().float().cpu()  # [b, L, H, G]
              for rows in _batched_rows(model, images, prompts, layers, settings.batch_size, intervention,
                                        desc=f"stealing ({condition})", progress=progress)]
    mass = torch.cat(masses).numpy().astype(np.float64)  # [N, L, H, G]
    n, n_layers, n_heads, _ = mass.shape
    per_sample = n_layers * n_heads
    gi = {g: i for i, g in enumerate(GROUP_NAMES)}
    frame = pd.DataFrame({
        "sample_id": np.repeat(np.asarray(ids, dtype=object), per_sample),
        "condition": np.full(n * per_sample, condition, dtype=object),
        "layer": np.tile(np.repeat(np.asarray(layers, dtype=np.int64), n_heads), n),
        "head": np.tile(np.arange(n_heads, dtype=np.int64), n * n_layers),
        **{f"mass_{g}": mass[..., gi[g]].reshape(-1) for g in GROUP_NAMES},
        "ratio": ratio_from_mass(mass, settings).reshape(-1),
    })
    frame.attrs["stealing"] = {
        **settings.to_dict(), "layers": list(layers), "query": "last", "model": getattr(model, "name", None),
        "intervention": intervention.to_dict(),
    }
    return frame


def stealing_tables(model: "HookedLVLM", samples: Sequence["Sample"], attack: "Attack", *,
                    settings: StealingSettings | None = None, intervention: "Intervention | None" = None,
                    seed: int = 0, conditions: tuple[str, str] = ("clean", "triggered"),
                    progress: bool = True) -> "pd.DataFrame":
    """:func:`stealing_table` of the clean samples and of their triggered copies, concatenated.

    The triggered copies come from :func:`cleansight_analysis.attacks.triggered_copy` (same
    ``sample_id`` as their clean originals, so the two conditions pair up by id).

    Args:
        samples: clean samples.
        attack: the attack whose trigger is applied.
        settings, intervention, progress: as for :func:`stealing_table` (the intervention applies
            to both conditions).
        seed: per-image randomness of the trigger (``triggered_copy(..., seed=seed)``).
        conditions: labels of the clean and the triggered rows.

    Returns:
        the clean table followed by the triggered table (same columns, fresh index).
    """
    import pandas as pd


    owner = "stealing_tables"
    if (not isinstance(conditions, (tuple, list)) or len(conditions) != 2
            or not all(isinstance(c, str) and c for c in conditions) or conditions[0] == conditions[1]):
        raise InputError(f"{owner}: conditions must be two different non-empty labels, got {conditions!r}")
    samples = _check_samples(samples, owner)
    triggered = triggered_copy(samples, attack, seed=seed)
    clean = stealing_table(model, samples, condition=conditions[0], settings=settings, intervention=intervention,
                           progress=progress)
    trig = stealing_table(model, triggered, condition=conditions[1], settings=settings, intervention=intervention,
                          progress=progress)
    frame = pd.concat([clean, trig], ignore_index=True)
    frame.attrs["stealing"] = {**clean.attrs["stealing"], "attack": attack.to_dict(), "trigger_seed": seed,
                               "conditions": list(conditions)}
    return frame


# ---------------------------------------------------------------------------------------------
# Thief tokens: which image tokens take the attention, and do they sit on the trigger?
# ---------------------------------------------------------------------------------------------


def _grid_view(tokens: Any, grid: str | None, where: str) -> Any:
    if grid is None:
        return tokens.grid
    view = next((g for g in tokens.grids if g.name == grid), None)
    if view is None:
        raise InputError(f"{where}: image has no grid {grid!r}; grids: {[g.name for g in tokens.grids]}")
    return view


def attention_grid(rows: "AttentionRows", sample: int = 0, *, layer: int | None = None, head: int | None = None,
                   image: int = 0, grid: str | None = "base") -> torch.Tensor:
    """Attention of one sample's query on its image tokens, laid out as the picture.

    Args:
        rows: from ``HookedLVLM.attention_rows(..., query="last")`` (``values [B, L, H, K]``).
        sample: index in the batch.
        layer: an LM layer present in ``rows.layers`` (``None``: every recorded layer).
        head: a head index (``None``: the mean over heads).
        image: which image of the sample.
        grid: grid name (``"base"``: LLaVA-1.5's only grid, LLaVA-NeXT's low-res overview; ``None``:
            the finest grid).

    Returns:
        ``[rows, cols]`` (or ``[L, rows, cols]`` when ``layer`` is None) post-softmax attention.
    """
    if rows.per_query:
        raise InputError("attention_grid: rows carry several queries per sample; use query='last' rows")
    b, n_layers, n_heads, _ = rows.values.shape
    if not _is_int(sample) or not -b <= sample < b:
        raise InputError(f"attention_grid: sample={sample!r} is outside the batch of {b}")
    groups = rows.groups[sample]
    if not _is_int(image) or not 0 <= image < len(groups.images):
        raise InputError(f"attention_grid: image={image!r}; the sample has {len(groups.images)} image(s)")
    values = rows.values[sample]  # [L, H, K]
    if layer is not None:
        if layer not in rows.layers:
            raise InputError(f"attention_grid: layer {layer!r} was not recorded; recorded layers: {list(rows.layers)}")
        values = values[rows.layers.index(layer)]  # [H, K]
    if head is None:
        values = values.mean(-2)
    else:
        if not _is_int(head) or not 0 <= head < n_heads:
            raise InputError(f"attention_grid: head={head!r} is out of range 0..{n_heads - 1}")
        values = values[..., head, :]
    view = _grid_view(groups.images[image], grid, "attention_grid")
    return values[..., view.positions]


def _processor_view_of_mask(model: "HookedLVLM", mask: np.ndarray) -> torch.Tensor:
    """The trigger mask pushed through the model's image processor: ``[h, w]`` in [0, 1].

    The mask is drawn as a black/white image and processed exactly like a picture (resize, crop,
    normalisation, then normalisation undone), so it lines up with the ``base`` grid whatever the
    processor's geometry (shortest-edge resize + centre crop for LLaVA-1.5; NeXT's low-res view).
    """

    img = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    ip = model.processor.image_processor
    pix = ip(images=[img], return_tensors="pt")["pixel_values"][0]
    if pix.dim() == 4:  # LLaVA-NeXT: [patches, 3, h, w]; patch 0 is the whole image (base grid)
        pix = pix[0]
    mean = torch.tensor(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0])[:, None, None]
    std = torch.tensor(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0])[:, None, None]
    return (pix.float() * std + mean).clamp(0, 1).mean(0)


def trigger_grid(model: "HookedLVLM", mask: np.ndarray | None, grid_shape: tuple[int, int], *,
                 threshold: float = 0.5) -> torch.Tensor | None:
    """Grid cells that overlap the trigger: bool ``[rows, cols]``, or ``None`` for a global trigger.

    Args:
        model: its image processor gives the geometry from image pixels to the ``base`` grid.
        mask: bool ``[H, W]`` pixels of the trigger on the image fed to the model (``attack.trigger_mask``).
        grid_shape: ``(rows, cols)`` of the image's ``base`` grid (from the token groups).
        threshold: a processed pixel counts as trigger when its resampled mask value is at least
            this; a cell overlaps the trigger when any of its pixels does.
    """
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise InputError(f"trigger_grid: mask must be a bool [H, W] array, got {mask.dtype} {mask.shape}")
    if not 0.0 < float(threshold) <= 1.0:
        raise InputError(f"trigger_grid: threshold={threshold!r} must be in (0, 1]")
    view = _processor_view_of_mask(model, mask)  # [h, w]
    rows, cols = int(grid_shape[0]), int(grid_shape[1])
    if view.shape[0] < rows or view.shape[1] < cols:
        raise InputError(f"trigger_grid: processed image {tuple(view.shape)} is smaller than the grid {grid_shape}")
    pooled = torch.nn.functional.adaptive_max_pool2d(view[None, None], (rows, cols))[0, 0]
    return pooled >= float(threshold)


def thief_map(model: "HookedLVLM", sample: "Sample", *, layer: int, head: int | None = None,
              intervention: "Intervention | None" = None, grid: str | None = "base") -> torch.Tensor:
    """The query's attention on the image grid of one sample: ``[rows, cols]`` (for plotting).

    Runs one forward pass recording only ``layer``; ``head=None`` averages the heads. Draw it with
    :func:`cleansight_analysis.plotting.attention.plot_image_attention` over ``model.processed_image``.
    """
    intervention = _check_intervention(intervention, "thief_map")
    layer = model.check_layers(layer)[0]
    image = _images_of(sample, 0, intervention)
    rows = next(iter(_batched_rows(model, [image], [sample.prompt], [layer], 1, intervention,
                                   desc="thief map", progress=False)))
    return attention_grid(rows, 0, layer=layer, head=head, grid=grid)


def thief_tokens(model: "HookedLVLM", samples: Sequence["Sample"], attack: "Attack", *,
                 layers: int | Sequence[int] | None = None, k: int = 5, condition: str = "triggered",
                 heads: str = "mean", grid: str | None = "base", batch_size: int = 32, seed: int = 0,
                 threshold: float = 0.5, intervention: "Intervention | None" = None,
                 progress: bool = True) -> "pd.DataFrame":
    """Which image tokens the last prompt token attends to, and whether they sit on the trigger.

    Args:
        model: the hooked LVLM.
        samples: CLEAN samples (one image each). With ``condition="triggered"`` each image gets the
            trigger (``triggered_copy(samples, attack, seed=seed)``); with ``condition="clean"`` the
            clean image is scored against the place the trigger *would* occupy (a control).
        attack: gives the trigger and its mask (``attack.trigger_mask``); a global trigger (mask
            ``None``) gives NaN localisation scores.
        layers: LM layers (``None`` = all).
        k: number of top tokens (``1 <= k <=`` cells of the grid).
        heads: ``"mean"`` (head-averaged rows, ``head == -1``), ``"each"`` (one row per head) or
            ``"both"``.
        grid: the image grid to use; ``"base"`` (LLaVA-1.5's only grid; NeXT's low-res overview) is
            the one the trigger mask is mapped onto.
        batch_size, seed, threshold: forward batch size; trigger seed; see :func:`trigger_grid`.
        intervention: optional pixel/hook intervention applied on top. The trigger mask is NOT
            transformed: a pixel intervention that moves pixels (mirror, rotation, shrink) moves the
            trigger away from the cells scored as trigger cells.

    Returns:
        ``pandas.DataFrame``, one row per sample x layer (x head), with ``sample_id, condition,
        layer, head, grid_rows, grid_cols, grid_mass`` (attention on the grid's tokens),
        ``top1_cell, top1_row, top1_col, topk_cells`` (row-major cell indices ``r * cols + c``,
        best first), ``n_trigger_cells`` (NaN for a global trigger), ``top1_hit`` (1.0 if the top
        cell overlaps the trigger),
        ``topk_hit`` (1.0 if any top-k cell does), ``topk_precision`` (share of the top-k cells that
        do), ``trigger_share`` (share of the grid's attention on trigger cells), ``chance_share``
        (trigger cells / all cells: the share uniform attention would give), ``attention_map``
        (``[rows, cols]`` float32 array) and ``trigger_cells`` (bool ``[rows, cols]`` or None).
    """
    import pandas as pd


    owner = "thief_tokens"
    if not isinstance(attack, Attack):
        raise InputError(f"{owner}: attack must be an Attack (see get_attack), got {type(attack).__name__}")
    if condition not in ("triggered", "clean"):
        raise InputError(f"{owner}: condition={condition!r} must be 'triggered' or 'clean'")
    if heads not in THIEF_HEADS:
        raise InputError(f"{owner}: heads={heads!r} must be one of {THIEF_HEADS}")
    if not _is_int(k) or k < 1:
        raise InputError(f"{owner}: k={k!r} must be an int >= 1")
    batch_size = _check_batch_size(batch_size, owner)
    samples = _check_samples(samples, owner)
    for i, s in enumerate(samples):
        if isinstance(s.image, (list, tuple)):
            raise InputError(f"{owner}: samples[{i}] has several images; thief tokens need one image per sample")
    ids = _sample_ids(samples, owner)
    intervention = _check_intervention(intervention, owner)
    layer_list = model.check_layers(_check_layers_arg(layers, owner))

    originals = [to_rgb_image(s.image, where=f"samples[{i}].image") for i, s in enumerate(samples)]
    masks = [attack.trigger_mask(im.size, rng=attack.rng_for(i, seed)) for i, im in enumerate(originals)]
    if condition == "triggered":
        shown = [s.image for s in triggered_copy(samples, attack, seed=seed)]
    else:
        shown = [attack.prepare_image(im) for im in originals]  # same size as the triggered image
    images = [intervention.apply_image(im) for im in shown]
    prompts = [s.prompt for s in samples]

    cache: dict[tuple, torch.Tensor | None] = {}

    def cells_for(mask: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor | None:
        if mask is None:
            return None
        key = (mask.shape, shape, np.packbits(mask).tobytes())
        if key not in cache:
            cache[key] = trigger_grid(model, mask, shape, threshold=threshold)
        return cache[key]

    records: dict[str, list] = {c: [] for c in (
        "sample_id", "layer", "head", "grid_rows", "grid_cols", "grid_mass", "top1_cell", "top1_row", "top1_col",
        "topk_cells", "n_trigger_cells", "top1_hit", "topk_hit", "topk_precision", "trigger_share",
        "chance_share", "attention_map", "trigger_cells")}
    layers_arr = np.asarray(layer_list, dtype=np.int64)
    offset = 0
    for rows in _batched_rows(model, images, prompts, layer_list, batch_size, intervention,
                              desc=f"thief tokens ({condition})", progress=progress):
        for b in range(rows.values.shape[0]):
            i = offset + b
            view = _grid_view(rows.groups[b].images[0], grid, owner)
            n_rows, n_cols = view.shape
            n_cells = n_rows * n_cols
            if k > n_cells:
                raise InputError(f"{owner}: k={k} exceeds the {n_cells} cells of the {n_rows}x{n_cols} grid")
            per_head = rows.values[b][..., view.positions.reshape(-1)]  # [L, H, cells]
            n_heads = per_head.shape[1]
            blocks, head_ids = [], []
            if heads in ("mean", "both"):
                blocks.append(per_head.mean(1))  # [L, cells]
                head_ids.append(np.full(len(layer_list), HEAD_MEAN))
            if heads in ("each", "both"):
                blocks.append(per_head.reshape(-1, n_cells))  # [L * H, cells], layer-major
                head_ids.append(np.tile(np.arange(n_heads), len(layer_list)))
            att = torch.cat(blocks).double()  # [R, cells]
            layer_col = np.concatenate([layers_arr] * (heads in ("mean", "both"))
                                       + [np.repeat(layers_arr, n_heads)] * (heads in ("each", "both")))
            head_col = np.concatenate(head_ids)
            n_out = att.shape[0]
            top = att.topk(k, dim=-1).indices  # [R, k]
            mass = att.sum(-1)  # [R]
            if masks[i] is not None and view.name != "base":
                raise InputError(f"{owner}: trigger localisation maps the trigger onto the 'base' grid only; "
                                 f"got grid {view.name!r}")
            cells = cells_for(masks[i], (n_rows, n_cols))
            if cells is None:
                nan = np.full(n_out, np.nan)
                n_trig, top1_hit, topk_hit, prec, share, chance = math.nan, nan, nan, nan, nan, nan
                cell_col = [None] * n_out
            else:
                flat = cells.reshape(-1)
                hits = flat[top]  # [R, k]
                n_trig = float(flat.sum())
                top1_hit = hits[:, 0].double().numpy()
                topk_hit = hits.any(-1).double().numpy()
                prec = hits.double().mean(-1).numpy()
                share = (att[:, flat].sum(-1) / mass.clamp_min(1e-30)).numpy()
                chance = np.full(n_out, n_trig / n_cells)
                cell_col = [cells.numpy()] * n_out
            maps = att.float().reshape(n_out, n_rows, n_cols).numpy()
            records["sample_id"] += [ids[i]] * n_out
            records["layer"].append(layer_col)
            records["head"].append(head_col)
            records["grid_rows"] += [n_rows] * n_out
            records["grid_cols"] += [n_cols] * n_out
            records["grid_mass"].append(mass.numpy())
            records["top1_cell"].append(top[:, 0].numpy())
            records["top1_row"].append((top[:, 0] // n_cols).numpy())
            records["top1_col"].append((top[:, 0] % n_cols).numpy())
            records["topk_cells"] += [tuple(int(x) for x in t) for t in top.tolist()]
            records["n_trigger_cells"] += [n_trig] * n_out
            records["top1_hit"].append(top1_hit)
            records["topk_hit"].append(topk_hit)
            records["topk_precision"].append(prec)
            records["trigger_share"].append(share)
            records["chance_share"].append(chance)
            records["attention_map"] += list(maps)
            records["trigger_cells"] += cell_col
        offset += rows.values.shape[0]

    listed = {"sample_id", "grid_rows", "grid_cols", "topk_cells", "n_trigger_cells", "attention_map",
              "trigger_cells"}
    data = {c: (v if c in listed else np.concatenate(v)) for c, v in records.items()}
    frame = pd.DataFrame({"sample_id": data["sample_id"], "condition": condition,
                          **{c: data[c] for c in records if c != "sample_id"}})
    for col in ("layer", "head", "top1_cell", "top1_row", "top1_col"):
        frame[col] = frame[col].astype(np.int64)
    frame.attrs["thief_tokens"] = {
        "k": k, "heads": heads, "grid": grid, "threshold": threshold, "layers": list(layer_list),
        "attack": attack.to_dict(), "trigger_seed": seed, "model": getattr(model, "name", None),
        "intervention": intervention.to_dict(), "head_mean_code": HEAD_MEAN,
    }
    return frame
