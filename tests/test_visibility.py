"""The trigger-visibility probe (``evaluation.visibility``) and the tower features it reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cleansight_analysis.attacks import get_attack
from cleansight_analysis.errors import InputError
from cleansight_analysis.evaluation.visibility import MIN_PROBE_IMAGES, tpr_at_fpr, trigger_visibility
from cleansight_analysis.models.families import projector_inputs
from cleansight_analysis.plotting import summaries as S

from conftest import noise_image
from tolerances import F32_FORWARD_RTOL


def test_tpr_at_fpr_counts():
    clean = np.arange(100, dtype=float)  # 0 .. 99
    trig = np.array([97.5, 98.5, 99.5, 50.0])
    # FPR 1 %: one clean score (99) may lie above the threshold 98; 98.5 and 99.5 are above it
    assert tpr_at_fpr(clean, trig, 0.01) == (0.5, 0.01)
    # FPR 0: the threshold is the largest clean score
    assert tpr_at_fpr(clean, trig, 0.0) == (0.25, 0.0)
    assert tpr_at_fpr(clean, trig, 0.5)[1] == 0.5
    with pytest.raises(InputError, match="fpr"):
        tpr_at_fpr(clean, trig, 1.0)
    with pytest.raises(InputError, match="needs clean and triggered"):
        tpr_at_fpr([], trig, 0.01)


def test_vision_features_are_what_the_projector_reads(llava):
    images = [noise_image(i, (40 + 8 * i, 48)) for i in range(5)]
    feats = llava.vision_features(images, batch_size=2)
    pix = llava.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = projector_inputs(llava.hf_model, pix)
        n_tokens = sum(int(layout.n_tokens) for layout in llava.family.image_layouts(llava.config, pix[:1]))
        # the projector maps them onto the image-token embeddings the LM sees
        projected = llava.hf_model.model.multi_modal_projector(ref)
    assert feats.shape == ref.shape and feats.shape[1] == n_tokens
    assert projected.shape[-1] == llava.text_config.hidden_size
    # one batch of all five: the very same computation, bit for bit
    assert torch.equal(llava.vision_features(images, batch_size=5), ref.float())
    # batches of 2 vs 5: two float32 forwards of the tower with another batch composition
    scale = float(ref.abs().max())
    assert torch.allclose(feats, ref.float(), rtol=0, atol=F32_FORWARD_RTOL * scale)
    with pytest.raises(InputError, match="batch_size"):
        llava.vision_features(images, batch_size=0)
    with pytest.raises(InputError, match="no images"):
        llava.vision_features([])


def test_vision_features_of_llava_next_stack_the_tiles(llava_next):
    images = [noise_image(i, (64, 64)) for i in range(2)]
    feats = llava_next.vision_features(images)
    pix = llava_next.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert pix.dim() == 5
    per_tile = projector_inputs(llava_next.hf_model, pix[0]).shape[1]
    assert feats.shape == (2, pix.shape[1] * per_tile, feats.shape[-1])


class _Identity:
    """A "trigger" that leaves the image as it is."""

    def apply(self, image, *, rng=None):
        return image


def test_probe_sees_a_patch_and_not_a_no_op(llava):
    images = [noise_image(100 + i, (32, 32)) for i in range(160)]
    patch = get_attack("badnet", size=0.5, pattern="white")
    seen = trigger_visibility(llava, images, patch, seed=0)
    assert seen["n_train"] == 120 and seen["n_test"] == 40
    assert seen["auroc"] == 1.0 and seen["tpr"] == 1.0 and seen["feature_change"] > 0.0
    assert 0.0 <= seen["fpr"] <= seen["fpr_target"] == 0.01
    blind = trigger_visibility(llava, images, _Identity(), seed=0)
    assert blind["feature_change"] == 0.0
    # nothing to find: the held-out AUROC is that of scene noise (20 vs 20: sd ~0.09 around 0.5)
    assert blind["auroc"] < 0.85 and blind["tpr"] < 0.5


def test_probe_rejects_bad_settings(llava):
    images = [noise_image(i, (32, 32)) for i in range(MIN_PROBE_IMAGES)]
    patch = get_attack("badnet", size=0.5)
    with pytest.raises(InputError, match=f"at least {MIN_PROBE_IMAGES} images"):
        trigger_visibility(llava, images[:-1], patch)
    for kwargs, match in (({"test_fraction": 1.0}, "test_fraction"), ({"fpr": -0.1}, "fpr"),
                          ({"inverse_l2": 0}, "inverse_l2")):
        with pytest.raises(InputError, match=match):
            trigger_visibility(llava, images, patch, **kwargs)


def _visibility(wanet_tpr=0.23):
    return pd.DataFrame([
        {"attack": "badnet", "n_train": 1500, "n_test": 500, "auroc": 1.0, "tpr": 1.0, "fpr": 0.008, "fpr_target": 0.01,
         "feature_change": 0.243},
        {"attack": "wanet", "n_train": 1500, "n_test": 500, "auroc": 0.924, "tpr": wanet_tpr, "fpr": 0.008,
         "fpr_target": 0.01, "feature_change": 0.283},
    ])


def test_visibility_summary_line():
    from cleansight_analysis.plotting.summaries.layerwise import _visibility_line

    text = _visibility_line(_visibility())
    assert "1500 images to fit, 500 held out" in text
    assert "BadNet AUROC 1.00, TPR 100 % at FPR 1 %, feature change 0.24" in text
    assert "WaNet AUROC 0.92, TPR 23 % at FPR 1 %, feature change 0.28" in text
    assert "For WaNet the probe flags fewer than 90 % of the triggered images at FPR 1 %" in text
    seen = _visibility_line(_visibility(wanet_tpr=0.95))
    assert "For WaNet" not in seen and "Every trigger is plain to the projector." in seen
    assert "TPR 95 %" in seen
    assert S.layerwise.VISIBLE_TPR == 0.9


def test_visibility_plot_marks_the_hidden_trigger():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from cleansight_analysis.plotting.detection import VISIBLE_TPR, plot_trigger_visibility

    fig = plot_trigger_visibility(_visibility())
    ax_auc, ax_tpr = fig.axes
    # bars run top to bottom in table order: BadNet, then WaNet (below the line: warning colour)
    bars = sorted(ax_tpr.patches, key=lambda b: -b.get_y())
    assert [round(b.get_width(), 3) for b in bars] == [1.0, 0.23]
    assert to_hex(bars[0].get_facecolor()) != to_hex(bars[1].get_facecolor())
    names = {round(float(pos)): t.get_text() for pos, t in zip(ax_auc.get_yticks(), ax_auc.get_yticklabels())}
    assert names == {1: "BadNet", 0: "WaNet"}  # the first row on top
    assert any(abs(line.get_xdata()[0] - VISIBLE_TPR) < 1e-12 for line in ax_tpr.lines)
    assert "1500 images to fit, 500 held out" in fig._suptitle.get_text()
    plt.close(fig)
