"""diffcam.metrics: the paper's localization protocol on maps whose answer is known."""

import numpy as np
import pytest

from diffcam import metrics
from diffcam.refine import reference as ref


def _blob(h, w, y0, y1, x0, x1, bg=0.0):
    m = np.full((h, w), bg, np.float32)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_perfect_map_scores():
    m = _blob(16, 16, 4, 8, 4, 12)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:12] = True
    masks[1, 0:2, 0:2] = True
    s = metrics.localization(m, masks)
    assert s.obj_iou == 1.0 and s.concentration == pytest.approx(1.0)
    assert s.contrast > 1e6                      # background is exactly 0
    assert s.f3 == pytest.approx(3 / (1 + 1 + 1 / s.concentration))


def test_wrong_place_scores_zero():
    m = _blob(16, 16, 0, 4, 0, 4, bg=0.0)
    masks = np.zeros((1, 16, 16), bool); masks[0, 10:16, 10:16] = True
    s = metrics.localization(m, masks)
    assert s.obj_iou == 0.0 and s.concentration == 0.0 and s.f3 == 0.0


def test_uniform_map_is_uninformative():
    m = np.full((8, 8), 0.5, np.float32)
    masks = np.zeros((1, 8, 8), bool); masks[0, :4] = True
    s = metrics.localization(m, masks)
    assert s.contrast == pytest.approx(1.0) and s.concentration == pytest.approx(0.5)


def test_batch_list_of_mask_sizes_and_resize(rng):
    maps = np.stack([_blob(12, 12, 0, 6, 0, 6), _blob(12, 12, 6, 12, 6, 12)])
    m1 = np.zeros((1, 48, 48), bool); m1[0, :24, :24] = True
    m2 = np.zeros((2, 30, 30), bool); m2[1, 15:, 15:] = True
    s = metrics.localization(maps, [m1, m2])
    assert s.obj_iou.shape == (2,) and (s.obj_iou > 0.8).all()
    want = [ref.localization_2d(maps[0], m1), ref.localization_2d(maps[1], m2)]
    np.testing.assert_allclose(s.obj_iou, [w[0] for w in want], atol=0.02)


def test_summary_takes_f3_of_means():
    s = metrics.LocalizationScores(np.array([0.2, 0.4]), np.array([2.0, 3.0]),
                                   np.array([0.4, 0.6]), np.array([0.1, 0.2]))
    out = metrics.summarize(s)
    assert out["obj_iou"] == pytest.approx(0.3)
    assert out["f3_of_means"] == pytest.approx(metrics.f3_score(0.3, 2.5, 0.5))
    assert out["f3_mean"] == pytest.approx(0.15)
    hib = metrics.HIGHER_IS_BETTER
    assert all(hib[k] for k in ("obj_iou", "contrast", "concentration", "f3", "pointing_game",
                                "insertion_auc"))
    assert hib["deletion_auc"] is False


def test_otsu_threshold_api(rng):
    m = rng.random((3, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(metrics.otsu_threshold(m), ref.otsu_threshold_u8(ref.to_uint8(m)))


def test_bad_masks():
    m = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="masks"):
        metrics.localization(m, [np.zeros((8, 8))])
    with pytest.raises(ValueError, match="masks"):
        metrics.localization(m, np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="masks"):
        metrics.localization(m[0], np.zeros((1, 0, 8)))


# ------------------------------------------------------------------------------ pointing game
def _pointing_ref(m, masks, tol):
    """Brute force: the resized map's first maximum, and its distance to every object pixel."""
    from diffcam.refine.resize import resize_stack

    obj = np.asarray(masks, bool).reshape(-1, *np.shape(masks)[-2:]).any(axis=0)
    r = resize_stack(np.asarray(m, np.float32), obj.shape).astype(np.float64)
    if r.max() <= r.min():
        return False
    y, x = divmod(int(np.argmax(r)), r.shape[1])
    ys, xs = np.nonzero(obj)
    return bool(len(ys)) and bool(((ys - y) ** 2 + (xs - x) ** 2).min() <= tol * tol)


@pytest.mark.parametrize("tol", [0.0, 1.0, 2.5, 6.0])
def test_pointing_game_against_brute_force(tol):
    from diffcam.metrics import pointing_game

    rng = np.random.default_rng(int(tol * 10))
    maps, masks = [], []
    for i in range(60):
        h, w = rng.integers(1, 14, 2)
        m = rng.random((h, w)).astype(np.float32)
        if i % 7 == 0:
            m[:] = 0.25                          # no peak
        if i % 5 == 1:
            m = (m > 0.8).astype(np.float32)     # plateaus: the first maximum decides
        mk = np.zeros((int(rng.integers(1, 3)), 24, 20), bool)
        for c in range(mk.shape[0]):
            y, x = rng.integers(0, 20, 2)
            mk[c, y:y + int(rng.integers(1, 12)), x:x + int(rng.integers(1, 12))] = True
        maps.append(m)
        masks.append(mk)
    want = [_pointing_ref(m, mk, tol) for m, mk in zip(maps, masks)]
    got = [pointing_game(m, mk, tolerance=tol) for m, mk in zip(maps, masks)]
    assert got == want
    assert 0 < sum(want) < len(want)             # both outcomes occur
    same = [i for i, m in enumerate(maps) if m.shape == (6, 5)] or [0]
    batch = pointing_game(np.stack([maps[i] for i in same]), [masks[i] for i in same], tol)
    assert isinstance(batch, np.ndarray) and batch.tolist() == [want[i] for i in same]


def test_pointing_game_edges():
    from diffcam.metrics import pointing_game

    m = np.zeros((8, 8), np.float32)
    m[7, 7] = 1
    mask = np.zeros((8, 8), bool)
    mask[5, 5] = True
    assert not pointing_game(m, mask)
    assert not pointing_game(m, mask, tolerance=2.8)      # distance 2 * sqrt(2) = 2.83
    assert pointing_game(m, mask, tolerance=2.9)
    assert not pointing_game(m, np.zeros((8, 8), bool), tolerance=100)   # empty object
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance"):
            pointing_game(m, mask, tolerance=bad)
    with pytest.raises(ValueError):
        pointing_game(np.full((4, 4), np.nan, np.float32), mask)
