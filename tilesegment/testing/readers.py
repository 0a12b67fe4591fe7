"""The conformance test class every slide reader backend passes: subclass :class:`ReaderTests`
and provide a ``case`` fixture returning a :class:`Case` (an opened reader and what is known for
sure about its file). Importable by the tests of any backend; needs pytest.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

from tilesegment.errors import ConfigError
from tilesegment.io import SlideReader

ANY_MPP = "any"  # sentinel: the case does not pin mpp


@dataclass(frozen=True)
class Case:
    """An opened reader and what a test can assert about it."""

    reader: SlideReader
    backend: str
    levels: list[np.ndarray | None]
    """Expected (H, W, C) uint8 pixels of every level (None where not known)."""
    channels: int
    mpp: tuple[float, float] | str | None = None
    tolerance: float = 0.0
    """Allowed mean absolute difference to ``levels`` (0: exact, lossless data)."""
    offset_tolerance: dict[int, float] = field(default_factory=dict)
    """Per level, allowed mean abs difference between a box and the same pixels read as part of a
    bigger box (0 unless the backend resamples, as OpenSlide does at non-integer downsamples)."""

    @property
    def level_count(self) -> int:
        return len(self.levels)


def random_boxes(shape: tuple[int, int], count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``count`` random boxes (y, x, h, w) inside ``shape``, always including the corners."""
    height, width = shape
    rng = np.random.default_rng(seed)
    boxes = [(0, 0, min(height, 7), min(width, 9))]
    boxes.append((height - min(height, 5), width - min(width, 6), min(height, 5), min(width, 6)))
    for _ in range(count):
        h = int(rng.integers(1, min(height, 64) + 1))
        w = int(rng.integers(1, min(width, 64) + 1))
        y = int(rng.integers(0, height - h + 1))
        x = int(rng.integers(0, width - w + 1))
        boxes.append((y, x, h, w))
    return boxes


class ReaderTests:
    """What every ``SlideReader`` must do. Subclasses provide the ``case`` fixture."""

    @pytest.fixture
    def case(self) -> Case:  # pragma: no cover - overridden by every subclass
        raise NotImplementedError

    def test_is_a_slide_reader(self, case: Case) -> None:
        assert isinstance(case.reader, SlideReader)
        assert case.reader.info.backend == case.backend

    def test_info_is_consistent(self, case: Case) -> None:
        info = case.reader.info
        assert info.level_count == case.level_count == len(info.level_downsamples)
        assert info.channels == case.channels
        assert info.channels in (1, 3)
        assert info.level_downsamples[0] == 1.0
        assert all(b > a for a, b in itertools.pairwise(info.level_downsamples))
        h0, w0 = info.shape
        for (h, w), downsample in zip(info.level_shapes, info.level_downsamples, strict=True):
            assert h >= 1 and w >= 1
            assert downsample == pytest.approx((h0 / h + w0 / w) / 2, rel=0.01)
        for (h, w), expected in zip(info.level_shapes, case.levels, strict=True):
            if expected is not None:
                assert (h, w) == expected.shape[:2]
        assert "\n" not in repr(info)

    def test_mpp(self, case: Case) -> None:
        info = case.reader.info
        if case.mpp == ANY_MPP:
            return
        if case.mpp is None:
            assert info.mpp is None
            assert info.level_mpp(info.level_count - 1) is None
        else:
            assert info.mpp == pytest.approx(case.mpp)
            last = info.level_count - 1
            assert info.level_mpp(last) == pytest.approx(
                tuple(m * info.level_downsamples[last] for m in case.mpp)
            )

    def test_full_levels_match_expected(self, case: Case) -> None:
        for level, expected in enumerate(case.levels):
            if expected is None:
                continue
            h, w = case.reader.info.level_shapes[level]
            got = case.reader.read_region(level, 0, 0, h, w)
            expected = expected if expected.ndim == 3 else expected[..., None]
            assert got.shape == expected.shape
            if case.tolerance == 0:
                np.testing.assert_array_equal(got, expected, err_msg=f"level {level}")
            else:
                diff = np.abs(got.astype(float) - expected).mean()
                assert diff <= case.tolerance, f"level {level}: mean abs diff {diff:.2f}"

    def test_region_dtype_shape_contiguity(self, case: Case) -> None:
        info = case.reader.info
        for level, shape in enumerate(info.level_shapes):
            for y, x, h, w in random_boxes(shape, 3, seed=level):
                region = case.reader.read_region(level, y, x, h, w)
                assert region.dtype == np.uint8
                assert region.shape == (h, w, info.channels)
                assert region.flags.c_contiguous
                assert region.flags.writeable

    def test_accepts_numpy_integers(self, case: Case) -> None:
        a = case.reader.read_region(np.int64(0), np.int32(0), np.int64(0), np.uint8(3), 4)
        b = case.reader.read_region(0, 0, 0, 3, 4)
        np.testing.assert_array_equal(a, b)

    def test_box_equals_slice_of_bigger_box(self, case: Case) -> None:
        info = case.reader.info
        for level, (height, width) in enumerate(info.level_shapes):
            big = case.reader.read_region(level, 0, 0, height, width)
            for y, x, h, w in random_boxes((height, width), 6, seed=100 + level):
                small = case.reader.read_region(level, y, x, h, w)
                part = big[y : y + h, x : x + w]
                tolerance = case.offset_tolerance.get(level, 0)
                if tolerance == 0:
                    np.testing.assert_array_equal(small, part, err_msg=f"level {level}")
                else:
                    assert np.abs(small.astype(float) - part).mean() <= tolerance

    def test_threads_read_identical_pixels(self, case: Case) -> None:
        info = case.reader.info
        jobs = [
            (level, *box)
            for level, shape in enumerate(info.level_shapes)
            for box in random_boxes(shape, 6, seed=200 + level)
        ]
        serial = [case.reader.read_region(*job) for job in jobs]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(3):
                parallel = list(pool.map(lambda job: case.reader.read_region(*job), jobs))
                for job, a, b in zip(jobs, serial, parallel, strict=True):
                    np.testing.assert_array_equal(a, b, err_msg=f"job {job}")

    def test_out_of_bounds_box_raises(self, case: Case) -> None:
        info = case.reader.info
        last = info.level_count - 1
        height, width = info.level_shapes[last]
        bad = [
            (last, -1, 0, 1, 1),
            (last, 0, -1, 1, 1),
            (last, height - 1, 0, 2, 1),
            (last, 0, width - 1, 1, 2),
            (last, 0, 0, 0, 1),
            (last, 0, 0, 1, 0),
            (info.level_count, 0, 0, 1, 1),
            (-1, 0, 0, 1, 1),
        ]
        for args in bad:
            with pytest.raises(ConfigError, match=r"level|box") as raised:
                case.reader.read_region(*args)
            assert isinstance(raised.value, ValueError)
            assert "\n" not in str(raised.value)
        with pytest.raises(ConfigError, match=rf"shape {height}x{width}"):
            case.reader.read_region(last, 0, 0, height + 1, width)
        with pytest.raises(ConfigError, match="integers"):
            case.reader.read_region(0, 0.5, 0, 1, 1)  # type: ignore[arg-type]

    def test_close_is_idempotent_and_context_manager(self, case: Case) -> None:
        with case.reader as reader:
            assert reader is case.reader
        case.reader.close()
