import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tilesegment.io.mirror import PADDING_MODES, gather, normalization_affine, pad_indices
from tilesegment.errors import UsageError
from tilesegment.testing import assert_exact


@settings(max_examples=200)
@given(
    size=st.integers(1, 20),
    before=st.integers(0, 70),
    after=st.integers(0, 70),
    mode=st.sampled_from(PADDING_MODES),
)
def test_pad_indices_equal_numpy_pad_even_when_padding_exceeds_the_image(size, before, after, mode):
    line = np.arange(size)
    if mode == "constant":
        expected = np.pad(line, (before, after), mode="constant", constant_values=-1)
    else:
        expected = np.pad(line, (before, after), mode=mode)
    assert pad_indices(-before, size + before + after, size, mode).tolist() == expected.tolist()


def test_unknown_padding_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="padding 'wrap' is unknown"):
        pad_indices(0, 4, 4, "wrap")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64, np.bool_])
def test_gather_converts_mirrors_and_normalizes_like_numpy(dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        image = rng.normal(size=(9, 7, 2)).astype(dtype)
    elif dtype == np.bool_:
        image = rng.random((9, 7, 2)) > 0.5
    else:
        info = np.iinfo(dtype)
        image = rng.integers(0, info.max, size=(9, 7, 2)).astype(dtype)
    norm = ((0.2, 0.5), (0.5, 2.0))
    scale, offset = normalization_affine(image.dtype, 2, norm)
    iy, ix = pad_indices(-10, 30, 9), pad_indices(-3, 12, 7)
    out = np.empty((2, 30, 12), np.float32)
    gather(image.transpose(1, 0, 2).transpose(1, 0, 2), iy, ix, scale, offset, out)
    top = np.iinfo(dtype).max if np.dtype(dtype).kind in "ui" else 1.0
    unit = image.astype(np.float64) / top
    expected = (np.pad(unit, ((10, 11), (3, 2), (0, 0)), mode="reflect") - [0.2, 0.5]) / [0.5, 2.0]
    assert_exact(out, expected.transpose(2, 0, 1))


def test_gather_reads_channel_first_views_without_copy():
    image = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)  # (C, Y, X)
    view = image.transpose(1, 2, 0)
    scale, offset = normalization_affine(np.float32, 2)
    out = np.empty((2, 5, 4), np.float32)
    gather(view, np.arange(5), np.arange(4), scale, offset, out)
    np.testing.assert_array_equal(out, image)
