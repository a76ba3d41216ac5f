import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tilesegment as ts


@st.composite
def plans(draw):
    step = draw(st.sampled_from([1, 2, 4, 8, 16]))
    halo = draw(st.integers(0, 40))
    geom = ts.Geometry(halo=halo, step=step, shrink=2 * halo, min_input=2 * halo + step)
    shape = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    tile = tuple(step * draw(st.integers(1, 12)) for _ in range(2))
    factor = [draw(st.sampled_from(["same", "bigger", "smaller"])) for _ in range(2)]
    chunk = []
    for t, f in zip(tile, factor):
        if f == "bigger":
            chunk.append(t * draw(st.integers(2, 3)))
        elif f == "smaller":
            divisors = [d for d in range(1, t + 1) if t % d == 0]
            chunk.append(draw(st.sampled_from(divisors)))
        else:
            chunk.append(t)
    return ts.TilePlan.build(shape, geom, tile, tuple(chunk))


@settings(max_examples=150, deadline=None)
@given(plan=plans())
def test_plan_covers_every_pixel_exactly_once_on_the_step_grid(plan):
    count = np.zeros(plan.shape, np.int32)
    for tile in plan.tiles():
        (y, x), (h, w) = tile.origin, tile.size
        assert y % plan.geometry.step[0] == 0 and x % plan.geometry.step[1] == 0
        assert tile.input_origin == (y - plan.geometry.halo[0], x - plan.geometry.halo[1])
        assert h >= 1 and w >= 1
        count[y : y + h, x : x + w] += 1
    assert (count == 1).all()


@settings(max_examples=150, deadline=None)
@given(plan=plans())
def test_blocks_are_chunk_aligned_and_own_consecutive_tiles(plan):
    seen = []
    for block in plan.blocks():
        for axis in range(2):
            assert block.start[axis] % plan.chunk_size[axis] == 0
            assert block.stop[axis] % plan.chunk_size[axis] == 0 or block.stop[axis] == plan.shape[axis]
        for i in block.tiles:
            tile = plan.tile(i)
            assert tile.block == block.index
            for axis in range(2):
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
