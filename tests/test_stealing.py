"""Attention-stealing tables, thief tokens and the separability analyses (AUROC, whitened distance)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cleansight_analysis.attacks import get_attack
from cleansight_analysis.attention.separability import (
    SeparabilitySettings,
    WhitenedDistance,
    auroc,
    detector_scores,
    head_separability,
    layer_separability,
)
from cleansight_analysis.attention.stealing import (
    HEAD_MEAN,
    STEALING_COLUMNS,
    StealingSettings,
    attention_grid,
    stealing_table,
    stealing_tables,
    thief_map,
    thief_tokens,
    trigger_grid,
)
from cleansight_analysis.data.base import Sample
from cleansight_analysis.errors import CleanSightError, InputError, LayerIndexError
from cleansight_analysis.interventions import HookIntervention
from conftest import noise_image
from tolerances import F32_FORWARD_RTOL, F32_SUM_ATOL, ratio_rtol

PROMPTS = ["what color is it?", "shape?", "how many objects are in this picture?", "is it red?"]


def _samples(n: int = 4, size=(64, 64)) -> list[Sample]:
    return [Sample(noise_image(10 + i, size), PROMPTS[i % len(PROMPTS)], "x", sample_id=f"s{i}") for i in range(n)]


def _table(frame: pd.DataFrame, col: str, n_layers: int, n_heads: int) -> np.ndarray:
    return frame[col].to_numpy().reshape(-1, n_layers, n_heads)


# ------------------------------------------------------------------------------------ stealing table


def test_masses_sum_to_one_and_ratio_follows_text_keys(llava):
    samples = _samples(4)
    post = stealing_table(llava, samples, progress=False)
    instr = stealing_table(llava, samples, settings=StealingSettings(text_keys="instruction"), progress=False)
    n_l, n_h = llava.n_layers, llava.n_heads
    assert list(post.columns) == list(STEALING_COLUMNS)
    assert len(post) == 4 * n_l * n_h
    assert post.sample_id.tolist()[:: n_l * n_h] == ["s0", "s1", "s2", "s3"]
    assert (post.condition == "clean").all()
    assert post.layer.tolist()[: n_l * n_h] == np.repeat(np.arange(n_l), n_h).tolist()
    masses = post[["mass_system", "mass_image", "mass_prompt", "mass_template_tail"]].to_numpy()
    np.testing.assert_allclose(masses.sum(1), 1.0, atol=F32_SUM_ATOL)
    assert (post.mass_template_tail > 0).all() and (post.mass_prompt > 0).all()
    # the two denominators
    np.testing.assert_allclose(post.ratio, post.mass_image / (post.mass_prompt + post.mass_template_tail + 1e-12),
                               rtol=1e-9)
    np.testing.assert_allclose(instr.ratio, instr.mass_image / (instr.mass_prompt + 1e-12), rtol=1e-9)
    assert (instr.ratio > post.ratio).all()  # the instruction alone is a strictly smaller denominator
    np.testing.assert_array_equal(instr.mass_image, post.mass_image)
    assert post.attrs["stealing"]["text_keys"] == "post_image"


def test_table_equals_attention_rows(llava):
    samples = _samples(3)
    table = stealing_table(llava, samples, settings=StealingSettings(layers=[1, -1]), progress=False)
    assert sorted(table.layer.unique()) == [1, llava.n_layers - 1]
    batch = llava.prepare([s.image for s in samples], [s.prompt for s in samples], padding_side="right")
    rows = llava.attention_rows(batch, layers=[1, -1])
    mass = rows.group_mass()  # [B, L, H, G]
    for gi, name in enumerate(rows.group_names):
        got = _table(table, f"mass_{name}", 2, llava.n_heads)
        np.testing.assert_allclose(got, mass[..., gi].numpy(), atol=F32_FORWARD_RTOL)  # other batches
    # hand sums over the token groups of each sample
    for b, g in enumerate(batch.groups):
        image = rows.values[b][..., g.image].sum(-1)
        text = rows.values[b][..., torch.cat([g.prompt, g.template_tail])].sum(-1)
        np.testing.assert_allclose(_table(table, "ratio", 2, llava.n_heads)[b], (image / (text + 1e-12)).numpy(),
                                   rtol=ratio_rtol())


def test_batching_gives_the_batch_size_one_table(llava):
    samples = _samples(5)
    big = stealing_table(llava, samples, settings=StealingSettings(batch_size=4), progress=False)
    one = stealing_table(llava, samples, settings=StealingSettings(batch_size=1), progress=False)
    pd.testing.assert_frame_equal(big[["sample_id", "condition", "layer", "head"]],
                                  one[["sample_id", "condition", "layer", "head"]])
    for col in STEALING_COLUMNS[4:]:
        np.testing.assert_allclose(big[col], one[col], rtol=ratio_rtol(), atol=F32_FORWARD_RTOL, err_msg=col)


def test_stealing_tables_pairs_clean_and_triggered(llava):
    samples = _samples(3)
    attack = get_attack("badnet", size=16)
    both = stealing_tables(llava, samples, attack, settings=StealingSettings(layers=[0]), progress=False)
    per = llava.n_heads
    assert both.condition.tolist() == ["clean"] * 3 * per + ["triggered"] * 3 * per
    assert both.sample_id.tolist()[: 3 * per] == both.sample_id.tolist()[3 * per:]
    # the trigger changes the image and so the attention
    assert not np.allclose(both.ratio[: 3 * per], both.ratio[3 * per:])
    assert both.attrs["stealing"]["attack"]["name"] == "badnet"


# ------------------------------------------------------------------------------------ thief tokens


def _force_image_token(cell: tuple[int, int]) -> HookIntervention:
    """Every layer: the query row puts all its attention on the image token of grid cell ``cell``."""

    def factory(model, batch):
        def hook(pattern, hook):
            pattern = pattern.clone()
            for b, g in enumerate(batch.groups):
                target = int(g.images[0].grid.positions[cell])
                pattern[b, :, g.query, :] = 0.0
                pattern[b, :, g.query, target] = 1.0
            return pattern

        return model.lm_hooks("pattern", hook)

    return HookIntervention(factory, name=f"force{cell}", domain="attention")


def test_forced_pattern_makes_the_thief_token_and_localises_the_trigger(llava):
    samples = _samples(3)
    attack = get_attack("badnet", size=8)  # 8 px top-left patch = grid cell (0, 0) of the 8 x 8 grid
    hit = thief_tokens(llava, samples, attack, k=3, heads="both", intervention=_force_image_token((0, 0)),
                       progress=False)
    assert len(hit) == 3 * llava.n_layers * (llava.n_heads + 1)
    assert set(hit["head"]) == {HEAD_MEAN, *range(llava.n_heads)}
    assert (hit.grid_rows == 8).all() and (hit.grid_cols == 8).all()
    assert (hit.top1_cell == 0).all() and (hit.top1_row == 0).all() and (hit.top1_col == 0).all()
    assert (hit.n_trigger_cells == 1).all()
    assert (hit.top1_hit == 1).all() and (hit.topk_hit == 1).all()
    np.testing.assert_allclose(hit.trigger_share, 1.0, atol=1e-6)
    np.testing.assert_allclose(hit.topk_precision, 1 / 3)
    np.testing.assert_allclose(hit.chance_share, 1 / 64)
    first = hit.iloc[0]
    assert first.attention_map.shape == (8, 8) and first.attention_map[0, 0] == pytest.approx(1.0)
    assert first.trigger_cells[0, 0] and first.trigger_cells.sum() == 1

    miss = thief_tokens(llava, samples, attack, layers=[0, 2], k=1, intervention=_force_image_token((5, 6)),
                        progress=False)
    assert len(miss) == 3 * 2 and (miss["head"] == HEAD_MEAN).all()
    assert (miss.top1_cell == 5 * 8 + 6).all() and (miss.top1_row == 5).all() and (miss.top1_col == 6).all()
    assert (miss.top1_hit == 0).all() and (miss.topk_hit == 0).all()
    np.testing.assert_allclose(miss.trigger_share, 0.0, atol=1e-6)

    # the same hook seen through the stealing table: every image mass sits on the image
    table = stealing_table(llava, samples, intervention=_force_image_token((5, 6)), progress=False)
    np.testing.assert_allclose(table.mass_image, 1.0, atol=1e-6)


def test_thief_map_and_attention_grid(llava):
    sample = _samples(1)[0]
    grid = thief_map(llava, sample, layer=2, head=1, intervention=_force_image_token((2, 3)))
    assert grid.shape == (8, 8) and grid[2, 3] == pytest.approx(1.0) and grid.sum() == pytest.approx(1.0)
    batch = llava.prepare([sample.image], [sample.prompt])
    rows = llava.attention_rows(batch, layers=[1, 2])
    g = batch.groups[0].images[0]
    mean_map = attention_grid(rows, 0, layer=2)
    assert torch.allclose(mean_map, g.paint(rows.values[0, 1].mean(0)))
    assert attention_grid(rows, 0).shape == (2, 8, 8)
    with pytest.raises(InputError, match="layer 3 was not recorded"):
        attention_grid(rows, 0, layer=3)


def test_trigger_grid_follows_the_processor_geometry(llava):
    # a 64 x 64 image maps 1:1 onto the 8 x 8 grid of 8 px patches
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:16, 16:32] = True
    cells = trigger_grid(llava, mask, (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 2:4] = True
    assert torch.equal(cells, expected)
    # a 128 x 64 image is centre-cropped to x in [32, 96): a top-left patch falls outside the crop
    attack = get_attack("badnet", size=8, location="top-left")
    assert not trigger_grid(llava, attack.trigger_mask((128, 64)), (8, 8)).any()
    centred = trigger_grid(llava, get_attack("badnet", size=8, location="center").trigger_mask((128, 64)), (8, 8))
    assert centred.sum() == 4 and centred[3:5, 3:5].all()
    assert trigger_grid(llava, None, (8, 8)) is None


def test_global_trigger_gives_nan_localisation(llava):
    frame = thief_tokens(llava, _samples(2), get_attack("blended"), layers=[0], progress=False)
    assert frame.top1_hit.isna().all() and frame.trigger_share.isna().all() and frame.n_trigger_cells.isna().all()
    assert frame.top1_cell.between(0, 63).all()


# ------------------------------------------------------------------------------------ AUROC


def _brute_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_auroc_matches_sklearn_and_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(5):
        labels = rng.integers(0, 2, 300)
        scores = rng.integers(0, 6, 300).astype(float) + 0.7 * labels * (trial % 2)  # many ties
        ours = auroc(scores, labels)
        assert ours == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)
        try:
            from sklearn.metrics import roc_auc_score
        except ImportError:  # pragma: no cover - sklearn is a dev dependency
            continue
        assert ours == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [True, True, False, False]) == 1.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    with pytest.raises(InputError, match="both classes"):
        auroc([1, 2], [1, 1])
    with pytest.raises(InputError, match="NaN"):
        auroc([1, np.nan], [0, 1])
    with pytest.raises(InputError, match="0/1"):
        auroc([1, 2], [0, 2])
    with pytest.raises(InputError, match="3 scores but 2 labels"):
        auroc([1, 2, 3], [0, 1])


# ------------------------------------------------------------------------------------ separability


def _synthetic_table(n: int = 300, n_layers: int = 3, n_heads: int = 4, shift: float = 3.0, seed: int = 0):
    """Clean ratios ~ N(1, 0.1) per head. Layer 0: triggered == clean distribution. Layer 2: heads 0/1
    move by +/- ``shift`` sigmas (the head mean stays put)."""
    rng = np.random.default_rng(seed)
    frames = []
    for cond in ("clean", "triggered"):
        r = 1.0 + 0.1 * rng.standard_normal((n, n_layers, n_heads))
        if cond == "triggered":
            r[:, 2, 0] += 0.1 * shift
            r[:, 2, 1] -= 0.1 * shift
            r[:, 1, :] += 0.1 * shift  # layer 1: every head moves the same way
        frames.append(pd.DataFrame({
            "sample_id": np.repeat([f"id{i:04d}" for i in range(n)], n_layers * n_heads),
            "condition": cond,
            "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n),
            "head": np.tile(np.arange(n_heads), n * n_layers),
            "ratio": r.reshape(-1),
        }))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_whitened_distance_separates_constructed_data(covariance):
    table = _synthetic_table(shift=30.0)
    settings = SeparabilitySettings(covariance=covariance)
    sep = layer_separability(table, calibration_fraction=0.5, settings=settings)
    assert sep.layer.tolist() == [0, 1, 2]
    by = sep.set_index("layer")
    assert by.auroc_head_vector[2] == 1.0 and by.auroc_head_vector[1] == 1.0
    assert by.auroc_head_mean[1] == 1.0
    assert abs(by.auroc_head_mean[2] - 0.5) < 0.1  # the +/- shift cancels in the head mean
    assert abs(by.auroc_head_vector[0] - 0.5) < 0.1 and abs(by.auroc_head_mean[0] - 0.5) < 0.1
    # held-out accounting: 150 calibrate, 150 clean + the 150 triggered samples of other images are scored
    assert (sep.n_calibration == 150).all() and (sep.n_clean_test == 150).all()
    assert (sep.n_poisoned_test == 150).all()
    calib = set(sep.attrs["separability"]["calibration_ids"])
    scores = detector_scores(table, layers=[2], calibration_ids=sorted(calib), settings=settings)
    assert set(scores[scores.role == "calibration"].sample_id) == calib
    assert set(scores[scores.role == "excluded"].sample_id) == calib
    assert (scores[scores.role == "calibration"].condition == "clean").all()
    test = scores[scores.role == "test"]
    assert auroc(test.score, test.label) == 1.0


def test_whitened_distance_is_the_diagonal_mahalanobis_and_full_handles_singular_covariance():
    rng = np.random.default_rng(1)
    cal, x = rng.normal(size=(50, 3)) * [1.0, 2.0, 0.5], rng.normal(size=(5, 3))
    d = WhitenedDistance("diagonal").fit(cal).score(x)
    np.testing.assert_allclose(d, np.linalg.norm((x - cal.mean(0)) / (cal.std(0) + 1e-8), axis=1))
    full = WhitenedDistance("full", shrinkage=0.0).fit(cal).score(x)
    cov = np.cov(cal.T, bias=True)
    np.testing.assert_allclose(full, np.sqrt(np.einsum("ni,ij,nj->n", x - cal.mean(0), np.linalg.inv(cov),
                                                       x - cal.mean(0))), rtol=1e-6)
    # fewer samples than dimensions and a constant dimension: still finite
    few = np.c_[rng.normal(size=(4, 6)), np.ones(4)]
    assert np.isfinite(WhitenedDistance("full").fit(few).score(rng.normal(size=(3, 7)))).all()
    # "full" with Ledoit-Wolf: sklearn's shrinkage of the standardised features
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_lw

    z = (cal - cal.mean(0)) / (cal.std(0) + 1e-8)
    assert WhitenedDistance("full").fit(cal).shrinkage_ == pytest.approx(sk_lw(z, assume_centered=True), rel=1e-9)


def test_head_separability_directions():
    table = _synthetic_table(shift=30.0)
    heads = head_separability(table).set_index(["layer", "head"]).auroc
    assert heads[(2, 0)] == 1.0 and heads[(2, 1)] == 0.0  # raw ratio: the sign of the shift shows
    assert abs(heads[(0, 0)] - 0.5) < 0.1
    dist = head_separability(table, score="distance", calibration_fraction=0.5).set_index(["layer", "head"]).auroc
    assert dist[(2, 0)] == 1.0 and dist[(2, 1)] == 1.0


def test_bad_settings_raise_clear_errors(llava):
    with pytest.raises(InputError, match="text_keys='image'"):
        StealingSettings(text_keys="image")
    with pytest.raises(InputError, match="batch_size=0"):
        StealingSettings(batch_size=0)
    with pytest.raises(InputError, match="eps=-1"):
        StealingSettings(eps=-1)
    with pytest.raises(InputError, match="layers must be ints"):
        StealingSettings(layers=["a"])
    with pytest.raises(LayerIndexError, match="layer 9 is out of range"):
        stealing_table(llava, _samples(1), settings=StealingSettings(layers=[9]), progress=False)
    dup = [Sample(noise_image(0), "q?", "a", sample_id="same"), Sample(noise_image(1), "q?", "a", sample_id="same")]
    with pytest.raises(InputError, match="share sample_id 'same'"):
        stealing_table(llava, dup, progress=False)
    with pytest.raises(InputError, match="list of Sample"):
        stealing_table(llava, _samples(1)[0], progress=False)
    with pytest.raises(InputError, match="k=65 exceeds the 64 cells"):
        thief_tokens(llava, _samples(1), get_attack("badnet"), layers=[0], k=65, progress=False)
    with pytest.raises(InputError, match="heads='all'"):
        thief_tokens(llava, _samples(1), get_attack("badnet"), heads="all", progress=False)
    with pytest.raises(InputError, match="covariance='dense'"):
        SeparabilitySettings(covariance="dense")
    with pytest.raises(InputError, match="shrinkage=2"):
        SeparabilitySettings(shrinkage=2)
    table = _synthetic_table(n=20)
    with pytest.raises(InputError, match="calibration_fraction=1.0"):
        layer_separability(table, calibration_fraction=1.0)
    with pytest.raises(InputError, match="not clean samples"):
        layer_separability(table, calibration_ids=["nope", "id0001"])
    with pytest.raises(InputError, match="needs at least 2"):
        layer_separability(table, calibration_ids=["id0001"])
    with pytest.raises(InputError, match="lacks column"):
        layer_separability(table.drop(columns="ratio"))
    with pytest.raises(InputError, match="no rows with condition 'poisoned'"):
        layer_separability(table, settings=SeparabilitySettings(poisoned_condition="poisoned"))
    with pytest.raises(InputError, match="missing or duplicate rows"):
        layer_separability(table.drop(index=3))
    assert issubclass(InputError, CleanSightError)
