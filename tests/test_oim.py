import pytest
import torch

from luvc_common.compression.oim import (
    TokenGrid,
    block_major_to_raster,
    grid_positions,
    merge_step,
    merged_length,
    raster_to_block_major,
)
from luvc_common.compression.config import OIMConfig
from luvc_common.compression.methods import method_config
from luvc_common.errors import ConfigError
from luvc_common.config import ModelConfig
from luvc_common.models.loading import load_model
from luvc_common.engine.pipeline import Pipeline, encode
from luvc_common.models.family import family_of, get_family
from luvc_common.engine.language import Request
from transformers.vision_utils import get_vision_position_ids


def _encode(tower, pixels, grids, oim=None):
    """(projector output, merged grids) of the tower with OIM steps `oim` (None: no merging)."""
    out = encode(tower, pixels, grids, method_config("luvc", oim=oim, spu=None))
    return out.embeds, torch.tensor(out.grids)


def test_block_major_order_matches_transformers_positions():
    grid = (2, 6, 10)
    pos = get_vision_position_ids(torch.tensor([grid]), 2).float()
    raster = block_major_to_raster(pos, grid, 2)
    hh, ww = torch.meshgrid(torch.arange(6.0), torch.arange(10.0), indexing="ij")
    assert torch.equal(raster[0, ..., 0], hh) and torch.equal(raster[1, ..., 1], ww)
    assert torch.equal(raster_to_block_major(raster, 2), pos)


def _direct_merge(x, sizes, axis):
    """Reference: explicit loop over the raster grid, pairs then triples at the axis end."""
    n = x.shape[axis]
    out = merged_length(n, 2)
    groups, i = [], 0
    n_pairs = n - out if 2 * out >= n else 3 * out - n
    for g in range(out):
        width = 2 if g < n_pairs else (1 if 2 * out >= n else 3)
        groups.append(list(range(i, i + width)))
        i += width
    assert i == n
    xs, ss = [], []
    for members in groups:
        idx = torch.tensor(members)
        xm, sm = x.index_select(axis, idx), sizes.index_select(axis, idx)
        w = sm.unsqueeze(-1)
        xs.append((xm * w).sum(axis, keepdim=True) / w.sum(axis, keepdim=True))
        ss.append(sm.sum(axis, keepdim=True))
    return torch.cat(xs, axis), torch.cat(ss, axis)


@pytest.mark.parametrize("axis", ["w", "h"])
@pytest.mark.parametrize("grid", [(1, 8, 12), (2, 6, 10), (1, 4, 2)])
def test_merge_equals_direct_size_weighted_mean(axis, grid):
    torch.manual_seed(0)
    t, h, w = grid
    raster_x = torch.randn(t, h, w, 5)
    raster_s = torch.randint(1, 4, (t, h, w)).float()
    tokens = TokenGrid(
        raster_to_block_major(raster_x, 2), raster_to_block_major(raster_s, 2), grid_positions(grid, 2), (grid,)
    )
    merged = merge_step(tokens, axis, unit=2)
    dim = 1 if axis == "h" else 2
    expect_x, expect_s = _direct_merge(raster_x, raster_s, dim)
    (new_grid,) = merged.grids
    assert new_grid == tuple(expect_s.shape)
    assert torch.allclose(block_major_to_raster(merged.hidden, new_grid, 2), expect_x, atol=1e-6)
    assert torch.equal(block_major_to_raster(merged.sizes, new_grid, 2), expect_s)
    assert merged.sizes.sum() == raster_s.sum()  # every patch is accounted for exactly once


def test_mean_positions_are_centroids_of_merged_patches():
    grid = (1, 4, 6)
    tokens = TokenGrid(torch.zeros(24, 1), torch.ones(24), grid_positions(grid, 2), (grid,))
    merged = merge_step(tokens, "w", unit=2)
    assert merged.grids == ((1, 4, 2),)  # half of 6 is not a multiple of 2: two triples
    raster = block_major_to_raster(merged.positions, merged.grids[0], 2)
    assert torch.allclose(raster[0, 0, :, 1], torch.tensor([1.0, 4.0]))  # centroids of columns 0-2 and 3-5
    assert torch.allclose(raster[0, :, 0, 0], torch.arange(4.0))
    on_grid = merge_step(tokens, "w", unit=2, positions="grid")
    assert torch.equal(block_major_to_raster(on_grid.positions, (1, 4, 2), 2)[0, 0, :, 1], torch.tensor([0.0, 1.0]))


def test_merged_length_never_keeps_more_than_half():
    for n in range(2, 100, 2):
        out = merged_length(n, 2)
        assert out % 2 == 0 and (out <= n // 2 or n == 2)


@pytest.fixture(scope="module")
def tower(tiny_model):
    """The family's view of the checkpoint's vision tower; `tower.visual` is the stock module."""
    model = load_model(ModelConfig(tiny_model), "vision")
    family = family_of(model.config)
    return family.tower(family.vision(model))


GRIDS = torch.tensor([[1, 16, 16], [1, 18, 26], [2, 8, 12]])


def _pixels(seed=0):
    torch.manual_seed(seed)
    return torch.randn(int(GRIDS.prod(1).sum()), 3 * 2 * 14 * 14)


def test_no_merge_equals_stock_vision_forward(tower):
    px = _pixels()
    stock = tower.visual(px, grid_thw=GRIDS).pooler_output
    ours, grids = _encode(tower, px, GRIDS)
    assert torch.equal(grids, GRIDS)
    assert torch.allclose(ours, stock, atol=1e-5)


def test_schedule_sets_grids_and_counts(tower):
    px = _pixels()
    out, grids = _encode(tower, px, GRIDS, OIMConfig(merge_depths=(0.25, 0.5, 1.0), first_axis="w"))
    # w, then h, then w again; each side stays a multiple of 2
    assert grids.tolist() == [[1, 8, 4], [1, 8, 6], [2, 4, 2]]
    assert len(out) == int(grids.prod(1).sum()) // 4


def test_default_oim_halves_encoder_output(tower):
    px = _pixels()
    full, _ = _encode(tower, px[: 16 * 16], GRIDS[:1])
    half, grids = _encode(tower, px[: 16 * 16], GRIDS[:1], OIMConfig())
    assert len(half) * 2 == len(full) and grids.tolist() == [[1, 16, 8]]
    # odd half-width (26 -> 13 LLM columns): still at most half
    odd = torch.tensor([[1, 18, 26]])
    full, _ = _encode(tower, px[: 18 * 26], odd)
    half, _ = _encode(tower, px[: 18 * 26], odd, OIMConfig())
    assert len(half) * 2 <= len(full)


def test_merging_changes_features_only_where_merged(tower):
    """A merge at the very end averages the final block outputs; the projector sees the means."""
    px = _pixels()[: 16 * 16]
    grid = GRIDS[:1]
    out_end, g = _encode(tower, px, grid, OIMConfig(merge_depths=(1.0,)))
    out_mid, _ = _encode(tower, px, grid, OIMConfig(merge_depths=(0.5,)))
    assert g.tolist() == [[1, 16, 8]] and not torch.allclose(out_end, out_mid)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"merge_depths": (1.5,)}, "oim.merge_depths"),
        ({"merge_depths": (0.8, 0.2)}, "oim.merge_depths"),
        ({"merge_depths": ()}, "oim.merge_depths"),
        ({"merge_depths": (0.5,) * 17}, "oim.merge_depths"),
        ({"first_axis": "t"}, "oim.first_axis"),
        ({"positions": "median"}, "oim.positions"),
        ({"llm_positions": "grid"}, "oim.llm_positions"),
    ],
)
def test_invalid_oim_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        OIMConfig(**kwargs)


def test_source_positions_put_merged_cells_at_the_mean_of_their_source_cells():
    """Two text tokens, a 2 x 2 merged image (source 2 x 4 LLM cells) from position 2, then two text tokens."""
    t, h, w = (torch.tensor(v, dtype=torch.float) for v in ([0, 1, 2, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]))
    merged = torch.stack([t, h, w])[:, None]
    out = get_family("qwen2_vl").source_positions(merged, [[(torch.arange(2, 6), (1, 2, 2), (1, 2, 4))]])
    # unmerged, the image's columns would be 2..5 and the text after it would start at 2 + max(1, 2, 4)
    assert out[2, 0].tolist() == [0, 1, 2.5, 4.5, 2.5, 4.5, 6, 7]
    assert out[1, 0].tolist() == [0, 1, 2, 2, 3, 3, 6, 7] and out[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 6, 7]
    assert merged[2, 0, 2:6].tolist() == [2, 3, 2, 3]  # the input is left as it was


@pytest.mark.parametrize("llm_positions", ["merged", "source"])
def test_source_llm_positions_place_the_text_as_after_the_unmerged_grids(tiny_model, demo_image, demo_video, llm_positions):
    gen = Pipeline(ModelConfig(tiny_model))
    media = [demo_image, demo_video]
    cfg = method_config("luvc", spu=None, oim=OIMConfig(llm_positions=llm_positions))
    encoded = {name: gen.encoder.encode(media, c) for name, c in (("none", method_config("none")), ("oim", cfg))}
    assert encoded["oim"].grids != encoded["none"].grids and encoded["oim"].source_grids == encoded["none"].grids
    state = {name: gen.generator.engine.prefill([Request(gen.generator.prompt_ids("What is it?", e), e)], c)
             for (name, e), c in zip(encoded.items(), (method_config("none"), cfg))}
    same = torch.equal(state["oim"].next_position, state["none"].next_position)
    assert same == (llm_positions == "source"), (state["oim"].next_position, state["none"].next_position)
    assert state["oim"].next_position.dtype == torch.long
