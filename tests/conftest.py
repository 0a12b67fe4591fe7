"""Shared fixtures: the real data folder beside the checkout, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILESEGMENT_DATA", ROOT.parent / "shared" / "data")).resolve()


def data_path(*parts: str) -> Path:
    """Path of a file in the shared data folder; skips the test with a reason when absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set TILESEGMENT_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A fixed random depth-4 model with 4 base channels (fast on a busy CPU)."""
    from tilesegment.model import ModelSpec, UNetConfig, new_model, save_checkpoint

    spec = ModelSpec.default(UNetConfig(depth=4, base_channels=4, classes=3), name="tiny")
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(new_model(spec, seed=3), spec, path)
    return path


@pytest.fixture
def cmu_slide() -> Path:
    """The real Aperio slide CMU-1-Small-Region.svs (2967 x 2220 px, 0.499 um/px)."""
    return data_path("slides", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def dask_client():
    """A client of a real local dask cluster: 2 worker processes of 1 thread each, localhost.

    Not the default client: tests pass ``scheduler=dask_client`` (or its address) explicitly.
    """
    distributed = pytest.importorskip(
        "distributed", reason="dask.distributed is not installed (pip install -e '.[dev]')"
    )
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # no fixed port to clash with
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client
