import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen_vl_utils as q
from qwen_vl_utils import AspectRatioError, InvalidOptionError, smart_resize

from reference_0014 import nframes_0014, smart_resize_0014

# (height, width, factor, min_pixels, max_pixels) -> expected, worked out by hand from 0.0.14's rules
TABLE = [
    ((1080, 1920, 28, 4 * 28**2, 16384 * 28**2), (1092, 1932)),  # rounded: 38.6 -> 39, 68.6 -> 69
    ((1080, 1920, 32, 4 * 32**2, 16384 * 32**2), (1088, 1920)),  # 33.75 -> 34, 60 -> 60
    ((4000, 3000, 28, 3136, 1280 * 28**2), (1148, 840)),  # over budget: scaled by sqrt(12e6 / 1003520)
    ((10, 10, 28, 3136, 16384 * 28**2), (56, 56)),  # under budget: scaled up by sqrt(3136 / 100) = 5.6
    ((720, 1280, 28, 128 * 28**2, 768 * 28**2), (560, 1008)),  # video budget: scaled by sqrt(921600 / 602112)
    ((28, 28, 28, 3136, 16384 * 28**2), (56, 56)),
]


@pytest.mark.parametrize(("args", "expected"), TABLE)
def test_table_matches_0014(args, expected):
    assert smart_resize(*args) == expected
    assert smart_resize_0014(*args) == expected


@settings(max_examples=400, deadline=None)
@given(
    h=st.integers(1, 8000),
    w=st.integers(1, 8000),
    patch=st.sampled_from([14, 16]),
    lo_tokens=st.integers(1, 1024),
    extra=st.integers(0, 20000),
)
def test_properties(h, w, patch, lo_tokens, extra):
    factor = patch * 2
    min_pixels, max_pixels = lo_tokens * factor**2, (lo_tokens + extra) * factor**2
    if max(h, w) / min(h, w) > q.MAX_RATIO:
        with pytest.raises(AspectRatioError):
            smart_resize(h, w, factor, min_pixels, max_pixels)
        return
    rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
    assert rh % factor == 0 and rw % factor == 0
    assert rh >= factor and rw >= factor
    assert rh * rw <= max_pixels
    # the aspect ratio is kept to within one factor step: for the scale applied (none, up to min_pixels or
    # down to max_pixels), each side is within one factor of the source side times that scale
    scales = [1.0, math.sqrt(min_pixels / (h * w)), math.sqrt(max_pixels / (h * w))]
    pinned = min(rh, rw) == factor  # a side clamped at one factor cannot keep an extreme ratio
    assert pinned or any(abs(rh - h * s) <= factor and abs(rw - w * s) <= factor for s in scales)
    # wherever 0.0.14 itself returns a valid size, the result is identical
    ref = smart_resize_0014(h, w, factor, min_pixels, max_pixels)
    if min(ref) > 0 and ref[0] * ref[1] <= max_pixels:
        assert (rh, rw) == ref


def test_never_zero_where_0014_returns_zero():
    # 0.0.14 floors the short side to 0 for an elongated image on a small budget
    args = (10, 1900, 28, 784, 784 * 4)
    assert 0 in smart_resize_0014(*args)
    rh, rw = smart_resize(*args)
    assert rh == 28 and rw > 0 and rh * rw <= 784 * 4


def test_never_over_budget_where_0014_is():
    args = (30, 30, 28, 2352, 2352)  # min == max: 0.0.14 ceils 30x30 up to 56x56, past the budget
    ref = smart_resize_0014(*args)
    assert ref[0] * ref[1] > args[4]
    rh, rw = smart_resize(*args)
    assert rh * rw <= args[4]


@pytest.mark.parametrize(
    "args",
    [(0, 10, 28), (10, -1, 28), (10, 10, 0)],
)
def test_invalid_sizes(args):
    with pytest.raises(InvalidOptionError):
        smart_resize(*args)


def test_invalid_budgets():
    with pytest.raises(InvalidOptionError, match="max_pixels"):
        smart_resize(100, 100, 28, min_pixels=5000, max_pixels=4000)
    with pytest.raises(InvalidOptionError, match="patch group"):
        smart_resize(100, 100, 28, min_pixels=10, max_pixels=100)


def test_aspect_ratio_error_is_a_value_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 10 * 201, 28)


def test_factor_helpers():
    assert q.round_by_factor(41, 28) == 28 and q.round_by_factor(43, 28) == 56
    assert q.ceil_by_factor(29, 28) == 56 and q.floor_by_factor(55, 28) == 28
    assert math.isclose(q.FPS, 2.0) and q.FRAME_FACTOR == 2


# --- smart_nframes against 0.0.14's rule -------------------------------------------------------------------------


@settings(max_examples=800, deadline=None)
@given(
    total=st.integers(0, 20000),
    video_fps=st.floats(0.5, 240, allow_nan=False),
    fps=st.none() | st.floats(0.01, 60, allow_nan=False),
    min_frames=st.none() | st.integers(0, 64) | st.floats(0, 64, allow_nan=False),
    max_frames=st.none() | st.integers(2, 1000) | st.floats(2, 1000, allow_nan=False),
)
def test_smart_nframes_matches_0014(total, video_fps, fps, min_frames, max_frames):
    ele = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames}
    given_keys = {k: v for k, v in ele.items() if v is not None}  # None: the key is absent
    expected = nframes_0014(total, video_fps, **given_keys) if total else 0
    if total < q.FRAME_FACTOR:  # 0.0.14 raises; here 2 frames, the last one repeated
        assert q.smart_nframes(given_keys, total, video_fps) == q.FRAME_FACTOR
    elif q.FRAME_FACTOR <= expected <= total:
        assert q.smart_nframes(given_keys, total, video_fps) == expected
        assert q.smart_nframes(ele, total, video_fps) == expected  # explicit None is the same as absent
    else:  # where 0.0.14 raises ValueError, a typed error that says what to change
        with pytest.raises(InvalidOptionError, match="fps, min_frames and max_frames"):
            q.smart_nframes(given_keys, total, video_fps)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(2, 20000), nframes=st.integers(1, 20000), video_fps=st.floats(1, 120))
def test_smart_nframes_exact_count(total, nframes, video_fps):
    expected = max(q.FRAME_FACTOR, round(nframes / 2) * 2)  # 0.0.14 rounds to even (and 1 -> 0 raises there)
    if expected > total:
        with pytest.raises(InvalidOptionError, match="more than the"):
            q.smart_nframes({"nframes": nframes}, total, video_fps)
    else:
        assert q.smart_nframes({"nframes": nframes}, total, video_fps) == expected
