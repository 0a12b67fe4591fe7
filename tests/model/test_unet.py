"""The valid U-Net: its own geometry, exact tiling, and pickle-free checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tilesegment.errors import ConfigError, ModelError
from tilesegment.geometry import tile_grid, tile_indices
from tilesegment.infer.predict import Predictor, predict_image
from tilesegment.model import (
    ModelSpec,
    UNet,
    UNetConfig,
    checkpoint_paths,
    load_checkpoint,
    new_model,
    save_checkpoint,
)


def test_paper_geometry():
    net = UNet(UNetConfig(depth=4, base_channels=4))
    assert net.halo == 92
    assert net.pooling == 16
    assert net.output_size(572) == 388
    assert net.input_size(388) == 572
    assert net.valid_input_sizes(3) == [188, 204, 220]
    out = net(torch.zeros(1, 3, 572, 572))
    assert tuple(out.shape) == (1, 2, 388, 388)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_declared_geometry_matches_the_network(depth, upsampling):
    net = UNet(UNetConfig(depth=depth, base_channels=2, upsampling=upsampling))
    for n in net.valid_input_sizes(2):
        out = net(torch.zeros(1, 3, n, n + net.pooling))
        assert tuple(out.shape[-2:]) == (net.output_size(n), net.output_size(n + net.pooling))
        assert n - out.shape[-2] == 2 * net.halo


def test_invalid_size_names_the_nearest_valid_ones():
    net = UNet(UNetConfig(base_channels=4))
    with pytest.raises(ConfigError, match=r"nearest valid: 556 or 572"):
        net.check_input_size(570)
    with pytest.raises(ConfigError, match=r"nearest valid: 188"):
        net(torch.zeros(1, 3, 100, 188))
    with pytest.raises(ConfigError, match="not reachable"):
        net.input_size(390)


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(depth=4, base_channels=4),
        UNetConfig(depth=3, base_channels=4, upsampling="bilinear", batch_norm=True),
    ],
)
def test_tiles_equal_the_whole_image_pass(cfg):
    spec = ModelSpec.default(cfg)
    net = new_model(spec, seed=3)
    predictor = Predictor(net, spec)
    image = np.random.default_rng(0).integers(0, 256, (150, 221, 3), dtype=np.uint8)
    whole = predict_image(image, predictor)
    out_tile = net.output_size(net.valid_input_sizes(1, start=3)[0])
    grid = tile_grid(image.shape[:2], halo=net.halo, output_tile=out_tile, pooling=net.pooling)
    assert len(grid) > 4
    stitched = np.full_like(whole, np.nan)
    for t in grid:
        rows, cols = tile_indices(t, image.shape[:2])
        probs = predictor(image[t.source.slices][np.ix_(rows, cols)][None])[0]
        stitched[(slice(None), *t.write.slices)] = probs[(slice(None), *t.core.slices)]
    np.testing.assert_allclose(stitched, whole, atol=1e-5)


def test_checkpoint_round_trip_without_pickle(tmp_path):
    cfg = UNetConfig(depth=3, base_channels=4, in_channels=1, classes=3)
    spec = ModelSpec.default(cfg, name="m", mpp=0.5)
    net = new_model(spec, seed=7)
    weights, config = save_checkpoint(net, spec, tmp_path / "m")
    assert (weights, config) == checkpoint_paths(tmp_path / "m.json")
    assert weights.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    doc = json.loads(config.read_text())
    assert doc["halo"] == net.halo and doc["mpp"] == 0.5
    assert doc["valid_input_sizes"] == "92 + 8k"
    loaded, spec2 = load_checkpoint(tmp_path / "m.safetensors")
    assert spec2 == spec
    x = torch.rand(1, 1, 92, 100)
    torch.testing.assert_close(loaded(x), net(x))
    # Same seed, same weights: `model init` is reproducible.
    again = new_model(spec, seed=7)
    torch.testing.assert_close(again(x), net(x))


def test_tampered_or_mismatched_checkpoints_are_refused(tmp_path):
    spec = ModelSpec.default(UNetConfig(depth=2, base_channels=2), name="a")
    save_checkpoint(new_model(spec), spec, tmp_path / "a")
    other = ModelSpec.default(UNetConfig(depth=3, base_channels=2), name="b")
    save_checkpoint(new_model(other), other, tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(ModelError, match="SHA-256 does not match"):
        load_checkpoint(tmp_path / "a")
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "a", verify_hash=False)
    with pytest.raises(ModelError, match="model config not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable model config"):
        load_checkpoint(tmp_path / "c")
