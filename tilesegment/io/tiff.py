"""Plain, pyramidal and OME-TIFF files through tifffile's Zarr store.

Regions are read with ``TiffPageSeries.aszarr`` opened by zarr 3, so only the strips or tiles
that overlap a region are read and decoded, never the whole image.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from tilesegment.io.base import DecodeWarning, SlideInfo
from tilesegment.io.common import (
    DECODE_ERRORS,
    PROBE_MAX_BYTES,
    UM_PER_UNIT,
    ArrayLevelsReader,
    DamagedFileError,
    PixelLayout,
    describe,
    first_plane_warning,
    make_info,
    plausible_mpp,
    slide_error,
)
from tilesegment.io.integrity import (
    JpegChecker,
    structure_problem,
    tifffile_messages,
    truncated_segments,
)
from tilesegment.machine import cores_up_to

logger = logging.getLogger(__name__)

__all__ = ["TiffReader"]

_PH = tifffile.PHOTOMETRIC
_COLOUR_PHOTOMETRICS = {_PH.MINISWHITE, _PH.MINISBLACK, _PH.RGB, _PH.PALETTE, _PH.YCBCR}
_SUPPORTED_DTYPES = (np.uint8, np.uint16, np.bool_)
_UM_PER_RESUNIT = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit -> µm per unit
_ALPHA = {1: "associated", 2: "unassociated"}  # ExtraSamples values that mean opacity
_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}  # tifffile converts YCbCr to RGB only for these
_DAMAGED_HINT = "the copy is incomplete or the file is damaged; copy or export it again"


def _ome_size(path: Path, pixels: ET.Element, axis: str) -> float | None:
    """PhysicalSize{axis} of an OME Pixels element in µm, or None when absent or unusable."""
    value = pixels.get(f"PhysicalSize{axis}")
    if value is None:
        return None
    unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
    if unit not in UM_PER_UNIT:
        logger.debug("%s: ignoring OME PhysicalSize%s in unknown unit %r", path, axis, unit)
        return None
    try:
        size = float(value) * UM_PER_UNIT[unit]
    except ValueError:
        logger.debug("%s: ignoring unparsable OME PhysicalSize%s %r", path, axis, value)
        return None
    return size if size > 0 else None


def _ome_mpp(path: Path, ome_xml: str) -> tuple[float, float] | None:
    """(y, x) µm/px of the first OME Image from PhysicalSizeY/X and their units (default µm).

    When only one of the two is given, pixels are taken as square (logged at debug level).
    """
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError as exc:
        logger.debug("%s: unparsable OME-XML, no mpp (%s)", path, describe(exc))
        return None
    pixels = root.find("./{*}Image/{*}Pixels")
    if pixels is None:
        return None
    size_y, size_x = _ome_size(path, pixels, "Y"), _ome_size(path, pixels, "X")
    if size_y is not None and size_x is not None:
        return size_y, size_x
    known = size_y if size_y is not None else size_x
    if known is None:
        return None
    logger.debug("%s: OME gives one PhysicalSize only; assuming square pixels", path)
    return known, known


def _aperio_mpp(path: Path, description: str) -> tuple[float, float] | None:
    """(y, x) µm/px from the ``MPP = value`` field of an Aperio ImageDescription (square pixels).

    The description is a header line, then ``|``-separated ``key = value`` fields
    (``Aperio Image Library v11.2.1 ...|AppMag = 20|...|MPP = 0.499|...``). tifffile parses the
    same format in ``svs_description_metadata``, which it does not export.

    Examples
    --------
    >>> _aperio_mpp(Path("a.svs"), "Aperio Image Library v11|AppMag = 20|MPP = 0.499|Left = 2")
    (0.499, 0.499)
    >>> _aperio_mpp(Path("a.svs"), "Aperio Image Library v11|AppMag = 20") is None
    True
    """
    for item in description.split("|")[1:]:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "MPP":
            try:
                mpp = float(value)
            except ValueError:
                logger.debug("%s: ignoring unparsable Aperio MPP %r", path, value.strip())
                return None
            return plausible_mpp(path, mpp, mpp, source="Aperio MPP")
    return None


def _tag_mpp(
    path: Path, tif: tifffile.TiffFile, page: tifffile.TiffPage
) -> tuple[float, float] | None:
    """(y, x) µm/px from ImageJ's unit or the resolution tags, if plausible (see module notes)."""
    x_tag, y_tag = page.tags.get(282), page.tags.get(283)
    if x_tag is None or y_tag is None:
        return None
    x_res, y_res = page.get_resolution()
    if not (x_res > 0 and y_res > 0):
        return None
    unit = page.resolutionunit
    imagej = tif.imagej_metadata or {}
    if unit == 1 and str(imagej.get("unit", "")).lower() in UM_PER_UNIT:
        um_per_unit = UM_PER_UNIT[str(imagej["unit"]).lower()]
        source = f"ImageJ ({imagej['unit']})"
    elif unit in _UM_PER_RESUNIT:
        um_per_unit = _UM_PER_RESUNIT[unit]
        source = f"TIFF resolution tag ({tifffile.RESUNIT(unit).name.lower()})"
    else:
        logger.debug("%s: resolution tags without a length unit, no mpp", path)
        return None
    return plausible_mpp(path, um_per_unit / y_res, um_per_unit / x_res, source=source)


def _photometric_name(value: int) -> str:
    try:
        return _PH(value).name
    except ValueError:
        return f"photometric {int(value)}"


def _compression_name(page: tifffile.TiffPage) -> str:
    value = int(page.compression)
    try:
        return f"{tifffile.COMPRESSION(value).name} ({value})"
    except ValueError:
        return f"{value} (unknown to tifffile)"


class TiffReader(ArrayLevelsReader):
    """A :class:`~tilesegment.io.base.SlideReader` over the first image series of a TIFF file.

    Parameters
    ----------
    path : Path
        A TIFF, BigTIFF or OME-TIFF file: plain or pyramidal (SubIFDs, OME, reduced pages),
        tiled or striped, any compression tifffile/imagecodecs decode.
    probe : bool
        Decode one chunk (the tile or strip at the top-left of level 0) while opening, so an
        unsupported compression or broken codec fails in :func:`~tilesegment.io.open_slide`,
        not in the middle of a run. Chunks larger than 64 MiB decoded are not probed.

    Notes
    -----
    Pyramid levels are ``series.levels``; downsamples come from their shapes. Samples: gray
    stays one channel, RGB three, palette is mapped to RGB, alpha is composited on white,
    MinIsWhite is inverted, 16-bit is scaled by 255/65535 (warned once). Axes other than
    Y, X and samples (Z, T, C, pages) are read at index 0, with a warning if longer than 1.

    mpp: OME ``PhysicalSizeY/X`` (trusted, any length unit); for Aperio files (an SVS that
    OpenSlide refused, e.g. truncated) the ``MPP =`` field of the first page's description;
    otherwise the resolution tags (unit inch, cm, mm or µm; or ImageJ's unit when ResolutionUnit
    is none). Aperio and tag values are trusted only when they lie in 0.05–50 µm/px: 72 dpi
    defaults (352.8 µm/px) are ignored with a debug log.

    Damage: a file whose IFD chain points past its end (truncated) is read as far as it is
    intact, with one warning naming the file; it is refused when no image is left, or when the
    tile data of a level runs past the end of the file. JPEG tiles and strips are decoded a
    second time, strictly, to find corrupt data that still decodes (see
    :mod:`tilesegment.io.integrity`); each is logged once and listed by :meth:`decode_warnings`.

    Lifecycle: the file stays open until :meth:`close`. Thread-safety: ``read_region`` may be
    called from several threads; tifffile's Zarr store serialises every seek+read on the file
    handle's re-entrant lock (``FileHandle.set_lock(True)``, also taken by the JPEG check) and
    decodes outside it, and each calling thread's reads run on an event loop of its own (see
    :mod:`tilesegment.io.aio`), so no extra lock is needed. Picklability: not
    picklable; workers open their own reader from the path.
    """

    backend = "tiff"

    def __init__(self, path: Path, *, probe: bool = True) -> None:
        self.path = Path(path)
        self._size = self.path.stat().st_size
        self._checkers: list[JpegChecker | None] = []
        with tifffile_messages() as messages:
            try:
                self._tif = tifffile.TiffFile(self.path)
            except (tifffile.TiffFileError, *DECODE_ERRORS) as exc:
                raise DamagedFileError(
                    self.path,
                    structure_problem(messages, self._size)
                    or f"tifffile cannot parse the TIFF structure ({describe(exc)})",
                    _DAMAGED_HINT,
                ) from exc
            try:
                self._open(probe=probe, messages=messages)
            except BaseException:
                self._tif.close()
                raise

    def _first_series(self, messages: list[str]) -> tifffile.TiffPageSeries:
        """The image's first series; a damaged file (``messages``) fails or warns by what is
        left of it."""
        try:
            series = self._tif.series[0]
        except (IndexError, *DECODE_ERRORS) as exc:
            damage = structure_problem(messages, self._size)
            if damage is not None:
                raise DamagedFileError(
                    self.path, f"{damage}; no image is left", _DAMAGED_HINT
                ) from exc
            raise slide_error(self.path, f"the TIFF contains no image ({describe(exc)})") from exc
        damage = structure_problem(messages, self._size)
        if damage is not None:
            logger.warning(
                "%s: %s; reading the intact part with tifffile (OpenSlide does not open it)",
                self.path,
                damage,
            )
        return series

    def _open(self, *, probe: bool, messages: list[str]) -> None:
        tif = self._tif
        series = self._first_series(messages)
        self._series = series
        shape0 = tuple(series.get_shape(False))
        if 0 in shape0 or not shape0:
            raise slide_error(
                self.path,
                f"the image has zero size (array shape {shape0})",
                "the TIFF holds no pixels; re-export it",
            )
        keyframe = series.keyframe
        self._layout = self._make_layout(series)
        levels = series.levels
        for index, level in enumerate(levels):
            if tuple(level.get_axes(False)) != self._layout.axes:
                raise slide_error(
                    self.path,
                    f"pyramid level {index} has axes {level.get_axes(False)!r}, level 0 "
                    f"{''.join(self._layout.axes)!r}",
                    "the pyramid is malformed; rebuild it",
                )
            self._check_decoder(index, level.keyframe)
            self._check_data(index, level)
        self._arrays = [self._open_level(i) for i in range(len(levels))]
        tif.filehandle.set_lock(True)  # the JPEG checks read beside tifffile's Zarr store
        self._checkers = [
            JpegChecker(self.path, i, level.pages[0], tif.filehandle)
            if isinstance(level.pages[0], tifffile.TiffPage) and JpegChecker.applies(level.pages[0])
            else None
            for i, level in enumerate(levels)
        ]
        y_axis, x_axis = self._layout.axes.index("Y"), self._layout.axes.index("X")
        shapes = [(a.shape[y_axis], a.shape[x_axis]) for a in self._arrays]
        self.info: SlideInfo = self._make_info(series, keyframe, shapes)
        if series.dtype == np.uint16 and self._layout.palette is None:
            logger.warning(
                "%s: 16-bit samples are scaled to 8 bits (value * 255 / 65535)", self.path
            )
        if probe:
            self._probe()

    def _make_info(
        self, series: tifffile.TiffPageSeries, keyframe: Any, shapes: list[tuple[int, int]]
    ) -> SlideInfo:
        """What the file says about itself: format, µm/px, compression."""
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            mpp = _ome_mpp(self.path, tif.ome_metadata)
            vendor = "ome-tiff"
        elif tif.is_svs:
            mpp = _aperio_mpp(self.path, tif.pages.first.description)
            vendor = "aperio"
        else:
            mpp = _tag_mpp(self.path, tif, keyframe)
            vendor = "imagej-tiff" if tif.is_imagej else "generic-tiff"
        properties = {
            "tiff.series_kind": str(series.kind),
            "tiff.axes": "".join(self._layout.axes),
            "tiff.compression": _compression_name(keyframe),
            "tiff.photometric": _photometric_name(keyframe.photometric),
            "tiff.dtype": str(series.dtype),
            "tiff.tiled": str(keyframe.is_tiled),
        }
        return make_info(
            self.path,
            backend=self.backend,
            vendor=vendor,
            level_shapes=shapes,
            channels=self._layout.channels,
            mpp=mpp,
            properties=properties,
        )

    def _make_layout(self, series: tifffile.TiffPageSeries) -> PixelLayout:
        """Work out axes, colour, alpha and palette handling from the level-0 series."""
        keyframe = series.keyframe
        axes = tuple(series.get_axes(False))
        sizes = dict(zip(axes, series.get_shape(False), strict=True))
        if "Y" not in sizes or "X" not in sizes:
            raise slide_error(
                self.path,
                f"the image has no Y and X axes (axes {''.join(axes)!r})",
                "only 2-D images (optionally with samples) are supported",
            )
        if series.dtype.type not in _SUPPORTED_DTYPES:
            raise slide_error(
                self.path,
                f"unsupported sample type {series.dtype}",
                "convert the image to 8-bit (or 16-bit unsigned) integers",
            )
        photometric = keyframe.photometric
        if photometric not in _COLOUR_PHOTOMETRICS:
            raise slide_error(
                self.path,
                f"unsupported colour space {_photometric_name(photometric)}",
                "convert the image to RGB or grayscale",
            )
        if photometric == _PH.YCBCR and int(keyframe.compression) not in _JPEG_COMPRESSIONS:
            raise slide_error(
                self.path,
                f"YCbCr colour without JPEG compression ({_compression_name(keyframe)}) is not "
                "converted by tifffile",
                "convert the image to RGB",
            )
        if sizes.get("S", 1) > 1:
            sample_axis: str | None = "S"
        elif sizes.get("C", 1) in (3, 4):
            sample_axis = "C"  # OME/ImageJ RGB stored as one plane per channel
        else:
            sample_axis = "S" if "S" in sizes else None
        samples = sizes[sample_axis] if sample_axis else 1
        first_plane_warning(
            self.path, {a: n for a, n in sizes.items() if a not in ("Y", "X", sample_axis)}
        )
        palette = None
        if photometric == _PH.PALETTE:
            colormap = keyframe.colormap
            if colormap is None or samples != 1:
                raise slide_error(self.path, "palette image without a usable colour map")
            # TIFF colour maps are 16-bit; keep the high byte
            palette = np.ascontiguousarray((np.asarray(colormap) >> 8).astype(np.uint8).T)
            return PixelLayout(axes, sample_axis, 1, None, palette)
        color = 3 if samples >= 3 else 1
        extras = samples - color
        alpha = None
        if extras:
            kinds = tuple(int(v) for v in keyframe.extrasamples)
            if kinds and kinds[0] in _ALPHA:
                alpha = _ALPHA[kinds[0]]
            elif sample_axis == "C" and samples == 4:
                alpha = "unassociated"
            if extras > (1 if alpha else 0):
                logger.debug("%s: ignoring %d extra sample(s) %s", self.path, extras, kinds)
        invert = photometric == _PH.MINISWHITE and color == 1
        return PixelLayout(axes, sample_axis, color, alpha, invert=invert)

    def _check_decoder(self, index: int, keyframe: tifffile.TiffPage) -> None:
        """Fail now if tifffile has no decoder for this level (no I/O: decodes an empty segment)."""
        try:
            keyframe.decode(None, 0)
        except (NotImplementedError, *DECODE_ERRORS) as exc:
            raise slide_error(
                self.path,
                f"level {index} cannot be decoded (compression {_compression_name(keyframe)}: "
                f"{describe(exc)})",
                "convert the file to a supported compression (e.g. JPEG, deflate or LZW), "
                "or install imagecodecs with that codec",
            ) from exc

    def _check_data(self, index: int, level: tifffile.TiffPageSeries) -> None:
        """Refuse a level whose tile or strip data runs past the end of the file."""
        for page in level.pages:
            past = None if page is None else truncated_segments(page, self._size)
            if past is not None:
                count, end = past
                raise DamagedFileError(
                    self.path,
                    f"the file is truncated: {count} tiles/strips of level {index} end after "
                    f"its last byte (up to byte {end}, the file has {self._size} bytes)",
                    _DAMAGED_HINT,
                )

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        pixels = super()._read(level, y, x, h, w)
        checker = self._checkers[level] if self._checkers else None
        if checker is not None:
            checker.check(y, x, h, w)
        return pixels

    def decode_warnings(self) -> tuple[DecodeWarning, ...]:
        """JPEG tiles/strips read so far that decoded only with libjpeg warnings (corrupt data)."""
        return tuple(w for c in self._checkers if c is not None for w in c.warnings)

    def _open_level(self, index: int) -> zarr.Array:
        """Zarr array of one pyramid level; unsqueezed so every level has the same axes."""
        workers = cores_up_to(8)
        store = self._series.aszarr(level=index, squeeze=False, maxworkers=workers)
        try:
            array = zarr.open_array(store, mode="r", zarr_format=2)
        except DECODE_ERRORS as exc:
            raise slide_error(
                self.path,
                f"cannot open level {index} as an array ({describe(exc)})",
                "the TIFF structure is not supported; convert it to a tiled TIFF",
            ) from exc
        return array

    def _probe(self) -> None:
        """Decode the top-left pixel of level 0 (one tile or strip), unless that chunk is huge."""
        array = self._arrays[0]
        chunk_bytes = int(np.prod(array.chunks)) * array.dtype.itemsize
        if chunk_bytes > PROBE_MAX_BYTES:
            logger.debug("%s: not probing, first chunk is %d MiB", self.path, chunk_bytes // 2**20)
            return
        try:
            self._read(0, 0, 0, 1, 1)
        except DECODE_ERRORS as exc:
            raise slide_error(
                self.path,
                f"cannot decode the first tile/strip of level 0 (compression "
                f"{_compression_name(self._series.keyframe)}: {describe(exc)})",
                "the file is corrupt or uses an unsupported codec; re-export it",
            ) from exc

    def close(self) -> None:
        """Close the file; idempotent."""
        self._tif.close()
