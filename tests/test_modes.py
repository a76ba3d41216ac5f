"""Output modes: the device reduction of each mode is its host kernel, and modes say what they write."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tilesegment as ts
from tilesegment.modes import get_mode, mode_names


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(mode_names())), classes=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_device_reduction_equals_the_host_kernel(name, classes, seed):
    mode = get_mode(name)
    logits = np.random.default_rng(seed).normal(0, 3, (classes, 9, 7)).astype(np.float32)
    dest = np.zeros(mode.shape((9, 7), classes), mode.dtype)
    assert mode.kernel(logits, 0, 0, 9, 7, dest, 0, 0)
    reduced = mode.reduce(torch.from_numpy(logits)[None])[0].numpy()
    np.testing.assert_array_equal(reduced if mode.per_class else reduced[0], dest)


def test_modes_describe_their_output():
    labels, probs, logits = (get_mode(n) for n in ("labels", "probabilities", "logits"))
    assert labels.shape((4, 5), 3) == (4, 5) and probs.shape((4, 5), 3) == (3, 4, 5)
    assert (labels.dtype, probs.dtype, logits.dtype) == (np.uint8, np.uint8, np.float32)
    assert labels.label_count(1) == 2 and probs.label_count(3) is None
    window = np.full((3, 2, 2), 7, np.uint8)
    probs.fill(window)
    assert (window[0] == 255).all() and (window[1:] == 0).all()
    with pytest.raises(ts.UsageError, match="do not fit uint8 labels"):
        labels.check_classes(300)
    assert get_mode(probs) is probs


def test_unknown_mode_names_the_known_ones():
    with pytest.raises(ts.UsageError, match="mode 'masks' is unknown; use one of labels, probabilities, logits"):
        get_mode("masks")
