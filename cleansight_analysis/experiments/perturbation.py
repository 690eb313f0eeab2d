"""Fig. 1: pixel perturbation vs attention perturbation of a backdoored LVLM.

The paper sweeps a perturbation's intensity from 0 to 1 and reports the attack success rate (ASR):
the pixel transform ``ST`` (mirror, shrink + grey pad, rotate) barely lowers it, while flattening the
image attention of the text queries (``attn_uniform``) removes it. Here every sweep point is measured
with :func:`~cleansight_analysis.evaluation.intervention_sweeps.perturbation_sweep` for three *variants*:

- ``"pixel ST"``: the paper's pixel transform (``kind="st"``);
- ``"pixel noise"`` / ``"pixel JPEG"``: additive Gaussian noise and JPEG re-encoding (``kind="noise"`` /
  ``"jpeg"``), the two generic pixel purifiers, for contrast with the geometric ``ST``;
- ``"attention, text queries (paper)"``: ``attn_uniform`` on text queries in every LM layer (the
  paper's reading);
- ``"attention, detection layers"``: the same, but only in the layers CleanSight detects in
  (:meth:`~cleansight_analysis.defenses.CleanSight.choose_layers` with the default configuration on
  ``N_VAL`` clean calibration inputs; settings ``layers="detection"``): does flattening where the detector
  looks suffice?
- ``"attention, all queries (ours)"``: ``attn_uniform`` with ``queries="all"``, i.e. image-token
  queries are flattened too (this cuts the image-to-image route by which a trigger spreads into the
  other image tokens before a text query reads them).

Tables (one row per observation, cached in ``ctx.results_dir``):

- :func:`perturbation_table` / :func:`perturbation_tables`: ``attack, variant, kind, domain, queries, layers,
  intensity, asr, clean_acc, poisoned_acc, n``;
- :func:`st_thumbnail_table`: one triggered example image after ``ST`` at each intensity.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..attacks import triggered_copy
from ..defenses.cleansight import CleanSight
from ..errors import InputError
from ..evaluation.intervention_sweeps import perturbation_sweep
from ..inputs.images import to_rgb_image
from ..interventions.perturbations import get_perturbation, perturbation_class
from .detection import N_VAL

#: Intensities of the full sweep (``0`` is the unperturbed baseline shared by every variant).
DEFAULT_INTENSITIES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Intensities of a smoke run.
SMOKE_INTENSITIES: tuple[float, ...] = (0.0, 1.0)
#: The ``layers`` setting of an attention variant that means "CleanSight's detection layers of this model".
DETECTION_LAYERS = "detection"
#: ``(variant label, perturbation kind, settings)`` of the curves of Fig. 1.
DEFAULT_VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("pixel ST", "st", {}),
    ("pixel noise", "noise", {}),
    ("pixel JPEG", "jpeg", {}),
    ("attention, text queries (paper)", "attn_uniform", {"queries": "text"}),
    ("attention, detection layers", "attn_uniform", {"queries": "text", "layers": DETECTION_LAYERS}),
    ("attention, all queries (ours)", "attn_uniform", {"queries": "all"}),
)
#: Columns of :func:`perturbation_table`, in order.
PERTURBATION_COLUMNS: tuple[str, ...] = ("attack", "variant", "kind", "domain", "queries", "layers", "intensity",
                                         "asr", "clean_acc", "poisoned_acc", "n")
#: Longest side of the thumbnails stored by :func:`st_thumbnail_table` (pixels).
THUMBNAIL_SIDE = 160


def sweep_intensities(ctx: Any, intensities: Sequence[float] | None = None) -> list[float]:
    """The intensities to sweep: ``intensities`` (default :data:`DEFAULT_INTENSITIES`), or 2 points when smoking.

    ``0`` is always included (it is the shared baseline); values are sorted and must lie in ``[0, 1]``.
    """
    if ctx.smoke:
        levels = list(SMOKE_INTENSITIES)
    else:
        levels = list(DEFAULT_INTENSITIES if intensities is None else intensities)
    out = sorted({float(v) for v in levels} | {0.0})
    if any(not 0.0 <= v <= 1.0 for v in out):
        raise InputError(f"intensities must lie in [0, 1], got {levels!r}")
    return out


def _check_variants(variants: Any) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for item in variants:
        if not isinstance(item, (list, tuple)) or len(item) != 3 or not isinstance(item[0], str) \
                or not isinstance(item[1], str) or not isinstance(item[2], dict):
            raise InputError(f"each variant must be (label, kind, settings dict), got {item!r}")
        out.append((item[0], item[1], dict(item[2])))
    labels = [v[0] for v in out]
    if not out or len(set(labels)) != len(labels):
        raise InputError(f"variants must be non-empty with unique labels, got {labels!r}")
    return out


def perturbation_table(ctx: Any, attack: str, intensities: Sequence[float] | None = None, *,
                       variants: Sequence[tuple[str, str, dict[str, Any]]] = DEFAULT_VARIANTS,
                       max_new_tokens: int = 12, batch_size: int = 32) -> "Any":
    """ASR, clean and poisoned accuracy of ``attack``'s model against the intensity of each variant.

    Cached as ``perturbation_sweep_<attack>``. Pixel variants get ``seed=ctx.seed`` unless their
    settings name one.

    Args:
        ctx: the notebook's :class:`~cleansight_analysis.experiments.FigureContext`
            (``ctx.count()`` test samples).
        attack: which backdoored model (``ctx.load(attack)``).
        intensities: sweep points in ``[0, 1]`` (see :func:`sweep_intensities`).
        variants: ``(label, kind, settings)`` triples (default :data:`DEFAULT_VARIANTS`). An attention
            variant with ``layers="detection"`` flattens only the layers the default
            :class:`~cleansight_analysis.defenses.CleanSight` would detect in, chosen on ``ctx.count(N_VAL)``
            clean calibration inputs of the attack's model.
        max_new_tokens, batch_size: greedy generation settings.

    Returns:
        ``pandas.DataFrame`` with columns :data:`PERTURBATION_COLUMNS`: one row per variant x
        intensity. The intensity-0 row is measured once without any intervention (``kind="none"``)
        and repeated under every variant so that each curve starts at the same baseline. ``queries``
        is the query scope of attention variants (``"text"`` / ``"all"``) and ``"-"`` for pixel ones;
        ``layers`` the flattened LM layers (``"all"``, or e.g. ``"5,6,7"``; ``"-"`` for pixel variants);
        ``asr`` / ``clean_acc`` / ``poisoned_acc`` are shares in ``[0, 1]`` of ``n`` samples.
    """
    levels = sweep_intensities(ctx, intensities)
    variants = _check_variants(variants)
    n = ctx.count()

    def compute():
        import pandas as pd

        lvlm, attack_obj, _ = ctx.load(attack)
        samples = ctx.samples("test", n)
        nonzero = [v for v in levels if v > 0.0]
        frames, baseline, detection = [], None, None
        for label, kind, settings in variants:
            settings = dict(settings)
            cls = perturbation_class(kind)
            if "seed" in cls.setting_names():
                settings.setdefault("seed", ctx.seed)
            if settings.get("layers") == DETECTION_LAYERS:
                if detection is None:
                    detection, _ = CleanSight().choose_layers(lvlm, ctx.samples("calibration", ctx.count(N_VAL)))
                settings["layers"] = list(detection)
            points = nonzero + ([0.0] if baseline is None else [])
            frame = (perturbation_sweep(lvlm, samples, attack_obj, [kind], points, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, progress=not ctx.smoke, **settings)
                     if points else baseline.iloc[:0])
            if baseline is None:
                baseline = frame[frame["kind"] == "none"].copy()
                frame = frame[frame["kind"] != "none"]
            frame = pd.concat([baseline, frame], ignore_index=True)
            frame.insert(0, "variant", label)
            frame["queries"] = settings.get("queries", "text") if cls.domain == "attention" else "-"
            used = settings.get("layers")
            frame["layers"] = ("-" if cls.domain != "attention" else "all" if used is None
                               else ",".join(str(int(x)) for x in lvlm.check_layers(list(used))))
            frames.append(frame)
        out = pd.concat(frames, ignore_index=True)
        out.insert(0, "attack", attack)
        return out[list(PERTURBATION_COLUMNS)]

    return ctx.cached(f"perturbation_sweep_{attack}", compute, attack=attack, intensities=levels,
                      variants=[list(v) for v in variants], n=n, max_new_tokens=max_new_tokens,
                      n_val=ctx.count(N_VAL))


def perturbation_tables(ctx: Any, intensities: Sequence[float] | None = None, **kwargs: Any) -> "Any":
    """:func:`perturbation_table` of every attack in ``ctx.attacks``, concatenated (same columns)."""
    import pandas as pd

    return pd.concat([perturbation_table(ctx, a, intensities, **kwargs) for a in ctx.attacks], ignore_index=True)


def sweep_summary(sweep: "Any") -> "Any":
    """ASR and clean accuracy (in %) without perturbation and at the strongest intensity, per attack x variant.

    Args:
        sweep: :func:`perturbation_tables` rows.

    Returns:
        ``attack, variant, max intensity, ASR @0 %, ASR @max %, clean acc @0 %, clean acc @max %, n``.
    """
    import pandas as pd

    rows = []
    for (attack, variant), part in sweep.groupby(["attack", "variant"], sort=False):
        part = part.sort_values("intensity")
        lo, hi = part.iloc[0], part.iloc[-1]
        rows.append({"attack": attack, "variant": variant, "max intensity": float(hi["intensity"]),
                     "ASR @0 %": 100 * lo["asr"], "ASR @max %": 100 * hi["asr"],
                     "clean acc @0 %": 100 * lo["clean_acc"], "clean acc @max %": 100 * hi["clean_acc"],
                     "n": int(hi["n"])})
    return pd.DataFrame(rows).round(1)


def attack_of(ctx: Any, attack: str) -> Any:
    """The :class:`~cleansight_analysis.attacks.Attack` of ``attack``'s model, read from its card (no model load)."""
    return ctx.attack_object(attack)


def thumbnail(image: Any, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """``image`` as a uint8 ``[h, w, 3]`` array whose longest side is at most ``side`` pixels."""
    img = to_rgb_image(image, where="thumbnail")
    scale = side / max(img.size)
    if scale < 1.0:
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
    return np.asarray(img, dtype=np.uint8)


def st_thumbnail_table(ctx: Any, attack: str | None = None, intensities: Sequence[float] | None = None, *,
                       example: int = 0) -> "Any":
    """The triggered test image ``example`` after the pixel transform ``ST`` at each intensity.

    Cached as ``st_thumbnails``. No model is run (the attack comes from the model card).

    Args:
        attack: whose trigger (default: the first of ``ctx.attacks``).
        intensities: as for :func:`perturbation_table`.
        example: index of the test sample.

    Returns:
        ``pandas.DataFrame``, one row per intensity: ``attack, sample_id, intensity, mirrored, shrink_scale,
        angle_deg`` (the transform's draws; no mirror, scale 1 and angle 0 at intensity 0), ``image`` (uint8
        ``[h, w, 3]`` thumbnail, longest side <= :data:`THUMBNAIL_SIDE`; JSON text once reloaded).
    """
    attack = attack or ctx.attacks[0]
    levels = sweep_intensities(ctx, intensities)
    if not isinstance(example, int) or example < 0:
        raise InputError(f"example must be a test-sample index >= 0, got {example!r}")

    def compute():
        import pandas as pd

        samples = ctx.samples("test", example + 1)
        if len(samples) <= example:
            raise InputError(f"example={example} is beyond the {len(samples)} test samples of this run")
        sample = samples[example]
        trig = triggered_copy([sample], attack_of(ctx, attack), seed=ctx.seed)[0]
        img = to_rgb_image(trig.image, where="example image")
        rows = []
        for level in levels:
            pert = get_perturbation("st", level, seed=ctx.seed)
            scale, angle = pert.draw(pert.rng_for(img)) if level > 0 else (1.0, 0.0)
            rows.append({"attack": attack, "sample_id": sample.sample_id, "intensity": level,
                         "mirrored": bool(level > 0 and pert.mirror), "shrink_scale": scale, "angle_deg": angle,
                         "image": thumbnail(pert.apply_image(img))})
        return pd.DataFrame(rows)

    return ctx.cached("st_thumbnails", compute, attack=attack, intensities=levels, example=example)


def paper_fig1_claims() -> "Any":
    """What the paper's Fig. 1 reports (qualitatively; it gives no per-point numbers) vs where we measure it."""
    import pandas as pd

    return pd.DataFrame([
        {"curve": "pixel ST", "paper": "ASR stays high up to intensity 1",
         "our column": "asr of variant 'pixel ST'"},
        {"curve": "attention perturbation", "paper": "ASR falls to ~0 as intensity grows",
         "our column": "asr of the attention variants (every layer, detection layers only, all queries)"},
        {"curve": "noise / JPEG", "paper": "not in Fig. 1 (generic pixel purifiers; added here as a contrast)",
         "our column": "asr of variants 'pixel noise' and 'pixel JPEG'"},
        {"curve": "backdoored CLIP (contrast)", "paper": "a backdoored CLIP classifier is shown for contrast",
         "our column": "not reproduced: this project has no backdoored CLIP"},
    ])


__all__ = ["DEFAULT_INTENSITIES", "DEFAULT_VARIANTS", "DETECTION_LAYERS", "PERTURBATION_COLUMNS",
           "SMOKE_INTENSITIES",
           "attack_of", "paper_fig1_claims", "perturbation_table", "perturbation_tables", "st_thumbnail_table",
           "sweep_intensities", "sweep_summary", "thumbnail"]
