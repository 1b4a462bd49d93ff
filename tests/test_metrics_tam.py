"""diffcam.metrics.tam: Func-IoU, t_fg and F1-IoU against a float64 reference written here."""

import math

import numpy as np
import pytest

from diffcam.metrics import tam
from diffcam.refine import reference as ref


def _ref_threshold(maps, masks):
    ts = []
    for m, g in zip(maps, masks):
        hm, wm = np.asarray(g).shape[-2:]
        r = ref.resize_bilinear_2d(m, hm, wm) if m.shape != (hm, wm) else m
        ts.append(ref.otsu_threshold_u8_2d(ref.to_uint8(r)))
    return float(np.mean(ts)) if ts else float("nan")


def _ref_func(m, t, hw):
    r = ref.resize_bilinear_2d(m, *hw) if m.shape != tuple(hw) else np.asarray(m, np.float64)
    u8 = ref.to_uint8(r).astype(np.int64)
    return sum(1 for v in u8.ravel() if v < t) / u8.size


@pytest.mark.parametrize("seed", range(12))
def test_against_reference_on_random_images(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(2, 20, size=2)
    hm, wm = rng.integers(2, 40, size=2)
    k, f = rng.integers(1, 4), rng.integers(0, 5)
    obj = rng.random((k, h, w)).astype(np.float32) ** rng.uniform(0.5, 4)
    fun = rng.random((f, h, w)).astype(np.float32) ** rng.uniform(0.5, 4)
    masks = [rng.random((rng.integers(1, 3), hm, wm)) < 0.3 for _ in range(k)]
    s = tam.token_scores(obj, masks, fun)
    t = _ref_threshold(obj, masks)
    assert s.threshold == t
    assert s.obj_iou.shape == (k,) and s.func_iou.shape == (f,)
    for j in range(k):
        assert s.obj_iou[j] == pytest.approx(ref.localization_2d(obj[j], masks[j])[0], abs=1e-12)
    for j in range(f):
        assert s.func_iou[j] == pytest.approx(_ref_func(fun[j], t, (hm, wm)), abs=1e-12)


def test_func_iou_counts_strictly_below_the_threshold():
    # uint8 values 0, 25, 26, 255 around t = 26: 0 and 25 are background, 26 is not
    m = np.array([[0.0, 25.5 / 255], [26.5 / 255, 1.0]], np.float32)
    assert tam.func_iou(m, 26) == 0.5
    assert tam.func_iou(m, 27) == 0.75
    assert tam.func_iou(m, 0) == 0.0
    assert tam.func_iou(m, 256) == 1.0
    assert math.isnan(tam.func_iou(m, float("nan")))
    np.testing.assert_array_equal(tam.func_iou(np.stack([m, 1 - m]), 26), [0.5, 0.25])
    assert tam.func_iou(np.zeros((0, 3, 3), np.float32), 10).shape == (0,)
    # the resize happens first: a 1x2 map [0, 1] upsampled to 1x4 is [0, .25, .75, 1]
    assert tam.func_iou(np.array([[0.0, 1.0]], np.float32), 100, size=(1, 4)) == 0.5


def test_constant_and_empty_cases():
    mask = np.zeros((6, 6), bool)
    mask[:3] = True
    zero = np.zeros((6, 6), np.float32)
    s = tam.token_scores([zero], [mask], [zero, np.ones((6, 6), np.float32)])
    # a constant object map: Otsu gives 0, nothing is strictly below 0
    assert s.threshold == 0.0 and s.func_iou.tolist() == [0.0, 0.0]
    none = tam.token_scores([], [], [zero])
    assert math.isnan(none.threshold) and np.isnan(none.func_iou).all()
    assert none.obj_iou.shape == (0,)
    with pytest.raises(ValueError, match="object_masks has 1 entries for 0"):
        tam.token_scores([], [mask], [zero])
    with pytest.raises(ValueError, match="2 entries for 1 maps"):
        tam.token_scores([zero], [mask, mask], [])
    with pytest.raises(ValueError):                     # values above 1
        tam.token_scores([zero + 2], [mask], [])
    with pytest.raises(ValueError, match="same shape"):
        tam.token_scores([zero, np.zeros((3, 3), np.float32)], [mask, mask], [])


def test_summary_and_f1():
    a = tam.TokenScores(np.array([0.4, 0.6]), np.array([0.8, np.nan]), 12.0)
    b = tam.TokenScores(np.array([0.2]), np.array([0.5, 0.2]), 20.0)
    s = tam.summarize_tokens([a, b])
    assert s["obj_iou"] == pytest.approx(0.4) and s["func_iou"] == pytest.approx(0.5)
    assert s["f1_iou"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert (s["n_object_maps"], s["n_function_maps"]) == (3, 3)
    assert tam.f1_iou(0.0, 0.9) == 0.0 and tam.f1_iou(float("nan"), 0.5) == 0.0
    empty = tam.summarize_tokens([])
    assert math.isnan(empty["obj_iou"]) and empty["f1_iou"] == 0.0
    assert tam.TokenScores(np.array([0.5]), np.array([0.25]), 3.0).to_dict() == {
        "obj_iou": [0.5], "func_iou": [0.25], "threshold": 3.0}
