"""Property tests of the pure shard-layout math (one process, no torch.distributed)."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from fsdp_core._layout import make_layout

sizes = st.lists(st.integers(0, 200), min_size=1, max_size=12)
worlds = st.sampled_from([1, 2, 3, 4, 5, 8, 16])
aligns = st.sampled_from([1, 2, 4, 32])


def owner_map(layout):
    """flat index -> (rank, param index or None for padding), built from the pieces."""
    owned = {}
    for r in range(layout.world_size):
        lo, _ = layout.shard_range(r)
        for piece in layout.local_pieces(r):
            for j in range(piece.shard_start, piece.shard_end):
                flat = lo + j
                assert flat not in owned, f"flat element {flat} appears twice"
                is_real = j < piece.shard_start + piece.real_numel
                owned[flat] = (r, piece.index if is_real else None, piece.param_start + (j - piece.shard_start))
    return owned


@settings(max_examples=150, deadline=None)
@given(numels=sizes, world=worlds, align=aligns)
def test_every_element_owned_exactly_once(numels, world, align):
    layout = make_layout(numels, world, align=align)
    owned = owner_map(layout)
    assert sorted(owned) == list(range(layout.padded_numel))  # partition of the padded buffer
    for i, n in enumerate(numels):
        got = sorted(pos for (_, idx, pos) in owned.values() if idx == i)
        assert got == list(range(n)), f"param {i} elements not owned exactly once"


@settings(max_examples=150, deadline=None)
@given(numels=sizes, world=worlds, align=aligns)
def test_shard_sizes_and_padding(numels, world, align):
    layout = make_layout(numels, world, align=align)
    assert layout.shard_numel == max(1, math.ceil(layout.used_numel / world))
    assert layout.padded_numel == layout.shard_numel * world >= layout.used_numel
    assert layout.padded_numel - layout.used_numel < world or layout.used_numel == 0
    for off in layout.offsets:
        assert off % align == 0
    # Real elements never overlap; gaps between params are shorter than the alignment.
    for i in range(len(numels) - 1):
        end = layout.offsets[i] + numels[i]
        assert 0 <= layout.offsets[i + 1] - end < align
    for r in range(world):
        pieces = layout.local_pieces(r)
        assert sum(p.numel for p in pieces) == layout.shard_numel
        assert all(p.numel >= 0 and p.real_numel >= 0 and p.pad_numel >= 0 for p in pieces)
        # padding sits at the tail of each piece only
        for s, e in layout.padding_ranges(r):
            assert 0 <= s < e <= layout.shard_numel


@settings(max_examples=100, deadline=None)
@given(numels=sizes, world=worlds)
def test_unaligned_layout_pads_only_at_the_end(numels, world):
    layout = make_layout(numels, world, align=1)
    assert layout.used_numel == sum(numels)
    pads = [(r, s, e) for r in range(world) for s, e in layout.padding_ranges(r)]
    first_pad = min((r * layout.shard_numel + s for r, s, _ in pads), default=layout.padded_numel)
    assert first_pad == layout.used_numel  # padding only after the last parameter


@settings(max_examples=100, deadline=None)
@given(numels=sizes, world=worlds, align=aligns)
def test_shards_reassemble(numels, world, align):
    """Fill params with distinct values, shard by the layout, concatenate: same params back."""
    layout = make_layout(numels, world, align=align)
    params = [[(i + 1) * 1000 + k for k in range(n)] for i, n in enumerate(numels)]
    shards = []
    for r in range(world):
        shard = [0] * layout.shard_numel
        for p in layout.local_pieces(r):
            for j in range(p.real_numel):
                shard[p.shard_start + j] = params[p.index][p.param_start + j]
        shards.append(shard)
    flat = [x for s in shards for x in s]
    for i, n in enumerate(numels):
        off = layout.offsets[i]
        assert flat[off: off + n] == params[i]
    for r, (i_owner) in enumerate(shards):
        for s, e in layout.padding_ranges(r):
            assert all(v == 0 for v in shards[r][s:e])


@settings(max_examples=100, deadline=None)
@given(numels=sizes, world=worlds, align=aligns)
def test_owners_agree_with_pieces(numels, world, align):
    layout = make_layout(numels, world, align=align)
    for i, n in enumerate(numels):
        from_pieces = []
        for r in range(world):
            p = layout.local_pieces(r)[i]
            if p.real_numel:
                from_pieces.append((r, p.param_start, p.param_start + p.real_numel))
        assert list(layout.owners(i)) == from_pieces


def test_world_larger_than_numel():
    layout = make_layout([1], 8, align=1)
    assert layout.shard_numel == 1 and layout.padded_numel == 8
    reals = [layout.local_pieces(r)[0].real_numel for r in range(8)]
    assert reals == [1, 0, 0, 0, 0, 0, 0, 0]
    assert [layout.local_pieces(r)[0].pad_numel for r in range(8)] == [0] + [1] * 7


def test_zero_d_parameter_takes_one_element():
    layout = make_layout([1, 5], 4, align=4)
    assert layout.offsets == (0, 4) and layout.used_numel == 9 and layout.shard_numel == 3


@pytest.mark.parametrize("bad", [dict(numels=[3], world_size=0), dict(numels=[-1], world_size=2)])
def test_invalid_inputs_raise(bad):
    with pytest.raises(ValueError):
        make_layout(bad["numels"], bad["world_size"])
