"""Perturbations of the image or of the attention, behind one interface and one intensity scale.

Every perturbation is an :class:`~cleansight_analysis.models.intervention.Intervention` whose strength is
one number, ``intensity`` in ``[0, 1]`` (0 = no change), so that sweeps such as the paper's Fig. 1
(ASR against perturbation intensity, pixel versus attention perturbations) need nothing kind-specific::

    from cleansight_analysis.interventions.perturbations import get_perturbation

    st = get_perturbation("st", 0.7, seed=1)              # the paper's ST baseline at t = 0.7
    img2 = st.apply_image(img)                            # same size, RGB, deterministic
    flat = get_perturbation("attn_uniform", 1.0)          # image attention of text queries made uniform
    answers = generate_answers(model, samples, intervention=flat)

Kinds (:data:`PERTURBATION_KINDS`):

========== ========= ====================================================================================
kind       domain    what intensity ``t`` does
========== ========= ====================================================================================
st         pixel     the paper's ST: mirror, shrink by ``1 - U(0, 0.8 t)`` with grey (127) padding, rotate
                     by ``U(-180 t, 180 t)`` degrees with grey fill
shrinkpad  pixel     shrink by ``1 - 0.8 t`` (no randomness) and pad with grey
blur       pixel     the paper's Blur baseline: ``(1 - t) x + t blur(x)``, Gaussian radius ``0.06 t min(H, W)``
jpeg       pixel     JPEG re-encoding, quality falling linearly from 95 to 5 as ``t`` goes from 0+ to 1
noise      pixel     additive Gaussian pixel noise, std ``0.25 t`` of the 0..255 range
attn_uniform attention for text queries, each image's attention is pulled toward its mean:
                     ``p' = (1 - t) p + t mean(p)`` over that image's keys (in every chosen LM layer)
========== ========= ====================================================================================

Choices the paper leaves open are settings (dataclass fields) with the defaults above; see each class.
At intensity 0 every kind is the identity (pixel kinds return an unchanged RGB copy; ``st`` applies its
mirror only for ``t > 0``, so that ``t = 0`` is the unperturbed baseline).
"""

from __future__ import annotations

from .base import (ATTENTION_KINDS, GREY, PERTURBATION_KINDS, PERTURBATIONS, PIXEL_KINDS, Perturbation,
                   get_perturbation, perturbation_class)
from .pixel import ST, Blur, Jpeg, Noise, PixelPerturbation, ShrinkPad, shrink_and_pad  # registers first: kinds list in table order
from .attention import AttentionUniform, image_span_masks, interpolate_image_attention  # noqa: E402,I001

__all__ = [
    "ATTENTION_KINDS", "AttentionUniform", "Blur", "GREY", "Jpeg", "Noise", "PERTURBATIONS", "PERTURBATION_KINDS",
    "PIXEL_KINDS", "Perturbation", "PixelPerturbation", "ST", "ShrinkPad", "get_perturbation", "image_span_masks",
    "interpolate_image_attention", "perturbation_class", "shrink_and_pad",
]
