import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tilesegment as ts


@st.composite
def plans(draw):
    """2-D and 3-D plans, with per-axis (anisotropic) steps and halos and any chunk alignment."""
    ndim = draw(st.sampled_from([2, 3]))
    step = tuple(draw(st.sampled_from([1, 2, 4, 8, 16])) for _ in range(ndim))
    halo = tuple(draw(st.integers(0, 40)) for _ in range(ndim))
    geom = ts.Geometry(halo=halo, step=step, shrink=tuple(2 * h for h in halo),
                       min_input=tuple(2 * h + st_ for h, st_ in zip(halo, step)))
    top = 300 if ndim == 2 else 40
    shape = tuple(draw(st.integers(1, top)) for _ in range(ndim))
    tile = tuple(s * draw(st.integers(1, 12 if ndim == 2 else 4)) for s in step)
    chunk = []
    for t in tile:
        factor = draw(st.sampled_from(["same", "bigger", "smaller"]))
        if factor == "bigger":
            chunk.append(t * draw(st.integers(2, 3)))
        elif factor == "smaller":
            chunk.append(draw(st.sampled_from([d for d in range(1, t + 1) if t % d == 0])))
        else:
            chunk.append(t)
    return ts.TilePlan.build(shape, geom, tile, tuple(chunk))


def window(start, size):
    return tuple(slice(o, o + n) for o, n in zip(start, size))


@settings(max_examples=150, deadline=None)
@given(plan=plans())
def test_plan_covers_every_pixel_exactly_once_on_the_step_grid(plan):
    count = np.zeros(plan.shape, np.int32)
    geom = plan.geometry
    for tile in plan.tiles():
        assert all(o % st_ == 0 for o, st_ in zip(tile.origin, geom.step))
        assert tile.input_origin == tuple(o - h for o, h in zip(tile.origin, geom.halo))
        assert min(tile.size) >= 1
        count[window(tile.origin, tile.size)] += 1
    assert (count == 1).all()


@settings(max_examples=150, deadline=None)
@given(plan=plans())
def test_blocks_are_chunk_aligned_and_own_consecutive_tiles(plan):
    seen = []
    for block in plan.blocks():
        for axis in range(plan.geometry.ndim):
            assert block.start[axis] % plan.chunk_size[axis] == 0
            assert block.stop[axis] % plan.chunk_size[axis] == 0 or block.stop[axis] == plan.shape[axis]
        for i in block.tiles:
            tile = plan.tile(i)
            assert tile.block == block.index
            for axis in range(plan.geometry.ndim):
                assert block.start[axis] <= tile.origin[axis]
                assert tile.origin[axis] + tile.size[axis] <= block.stop[axis]
        seen.extend(block.tiles)
    assert seen == list(range(plan.n_tiles))


def test_unaligned_chunk_size_is_refused_with_advice():
    geom = ts.Geometry(halo=4, step=8)
    with pytest.raises(ts.InvalidTileSize, match="not aligned"):
        ts.TilePlan.build((100, 100), geom, 64, chunk_size=48)


def test_computed_fraction_of_paper_net_at_tile_512_on_large_image():
    plan = ts.TilePlan.build((512 * 20, 512 * 20), ts.UNet(3, 2).geometry, 512)
    assert plan.computed_fraction() == pytest.approx((700 / 512) ** 2)
