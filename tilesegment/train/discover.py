"""Which files are the image/label pairs of ``train`` and ``evaluate``: the layouts they read.

:func:`discover` looks at ``--images`` (and ``--labels``, default: the same tree) and returns
the pairs as :class:`PairSource` values (paths only; :mod:`tilesegment.train.readers` reads
them). The layouts:

* **stacks**: two files, a multi-page TIFF each (ISBI 2012: slice ``i`` is ``stem:i``), or
  ``.npy``/``.npz`` arrays (images (N, H, W[, C]), masks (N, H, W[, 1])); one ``.npz`` with an
  ``images`` and a ``masks`` array may be given alone.
* **DSB2018**: a folder of samples ``<id>/images/<id>.png`` + ``<id>/masks/*.png`` (one binary
  mask per object, merged into instance ids); the name of a pair is ``<id>``.
* **trees**, searched recursively, of every format tifffile or Pillow read (:data:`IMAGE_SUFFIXES`:
  PNG, TIFF, JPEG, BMP, GIF, ...). A label belongs to the image whose stem it carries plus a
  recognised suffix (:data:`LABEL_SUFFIXES`: ``a.png`` with ``a_mask.gif``) or, with
  ``--label-pattern '{stem}_GT.png'``, the pattern. In two trees a label may also have the image's
  exact stem (MoNuSeg, TNBC). An image stem ending in ``_training``, ``_test``, ``_image`` or
  ``_img`` is also matched without it (DRIVE: ``21_training.tif`` with ``21_manual1.gif``). PH2's
  own layout (``IMD002/IMD002_Dermoscopic_Image/IMD002.bmp`` with
  ``IMD002/IMD002_lesion/IMD002_lesion.bmp``) is one tree; ISIC (``_segmentation``) and Carvana
  (``_mask.gif``) are two. The name of a pair is the image's stem, unique in the tree. PH2's
  colour-region masks (``IMD002_roi/IMD002_R1_Label4.bmp``) are left out (logged).

A label that fits two images, an image that fits two labels, two images with one stem and an
unknown layout are errors naming the files, never a guess. Images without a label and labels
without an image are returned (:attr:`Discovery.unlabelled`, :attr:`Discovery.orphans`) so that
the caller can refuse them unless a name list leaves them out.

:func:`read_list` reads ``--list``-style files: one name a line, or ``image<TAB>label`` pairs
whose relative paths start at the list file's folder.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tilesegment.errors import ConfigError

log = logging.getLogger(__name__)

#: Label file stem suffixes, matched case-insensitively (longest first).
LABEL_SUFFIXES = (
    "_segmentation", "_manual1", "_lesion", "_labels", "_label", "_masks", "_mask", "_anno",
    "_seg", "_gt",
)  # fmt: skip
#: Image stem suffixes that may be dropped to find the label (DRIVE's ``21_training``).
IMAGE_NAME_SUFFIXES = ("_training", "_test", "_image", "_img")
ARRAY_SUFFIXES = (".npy", ".npz")
#: PH2's colour-region masks (``IMD002_roi/IMD002_R1_Label4.bmp``): annotations, not images.
PH2_REGION_MASK = re.compile(r".+_R\d+_Label\d+\.bmp", re.IGNORECASE)
#: Pillow extensions it registers but cannot decode without outside programs or plugins.
_PIL_STUBS = frozenset(
    {".bufr", ".grib", ".h5", ".hdf", ".eps", ".ps", ".wmf", ".emf", ".mpeg", ".mpg"}
)


def _image_suffixes() -> frozenset[str]:
    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(readable - _PIL_STUBS | {".tif", ".tiff"})


#: File suffixes (lower case) read as images or labels in trees.
IMAGE_SUFFIXES = _image_suffixes()


@dataclass(frozen=True, slots=True)
class PairSource:
    """Where one image (or stack) and its label(s) are stored."""

    name: str
    """Name of the pair: the image stem (a stack's slices become ``name:i`` when read)."""
    image: Path
    labels: tuple[Path, ...]
    """One label file, or a DSB sample's per-object masks (sorted)."""
    layout: str = "files"
    """``"files"``, ``"stack"``, ``"dsb"`` or ``"list"``."""


@dataclass(slots=True)
class Discovery:
    """What :func:`discover` found."""

    layout: str
    """Description for the log (``"one tree"``, ``"two trees"``, ``"DSB2018 samples"``, ...)."""
    root: Path
    """The image tree (or the stack's folder)."""
    pairs: list[PairSource]
    unlabelled: list[Path] = field(default_factory=list)
    """Images without a label (DSB: samples without masks)."""
    orphans: list[Path] = field(default_factory=list)
    """Labels without an image."""


# ------------------------------------------------------------------------------ naming rules
def label_matcher(pattern: str | None) -> re.Pattern[str]:
    """A regex whose ``stem`` group is the image stem a label file name belongs to.

    ``pattern`` is a file-name template with ``{stem}`` and optional ``*`` wildcards
    (``{stem}_GT.png``, ``mask_{stem}.*``); None matches the recognised suffixes.

    >>> label_matcher(None).fullmatch("IMD002_lesion.bmp")["stem"]
    'IMD002'
    >>> label_matcher("{stem}-GT.*").fullmatch("a-GT.png")["stem"]
    'a'
    """
    if pattern is None:
        alternatives = "|".join(re.escape(s) for s in LABEL_SUFFIXES)
        return re.compile(rf"(?P<stem>.+?)(?i:{alternatives})\.[^.]+")
    if pattern.count("{stem}") != 1 or "/" in pattern:
        raise ConfigError(
            f"--label-pattern {pattern!r} must be a file name with {{stem}} once "
            "(e.g. '{stem}_GT.png' or 'mask_{stem}.*')"
        )
    head, tail = (re.escape(part).replace(r"\*", ".*") for part in pattern.split("{stem}"))
    return re.compile(f"{head}(?P<stem>.+?){tail}")


def image_keys(stem: str) -> tuple[str, ...]:
    """Stems under which an image's label may be filed: its own, and without a recognised image
    suffix.

    >>> image_keys("21_training")
    ('21_training', '21')
    """
    for suffix in IMAGE_NAME_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem, stem[: -len(suffix)]
    return (stem,)


def tree_files(root: Path, *, skip: Path | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, hidden names and ``skip``, a folder
    inside ``root``, left out)."""
    if skip is not None and not skip.resolve().is_relative_to(root.resolve()):
        skip = None
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip.resolve()):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
    return found


# ------------------------------------------------------------------------------ layouts
def discover(images: Path, labels: Path | None = None, *, label_pattern: str | None = None) -> (
    Discovery
):  # fmt: skip
    """The image/label pairs of ``--images`` and ``--labels`` (see the module docstring).

    Raises
    ------
    ConfigError
        Missing paths, a file/folder mix, no images, ambiguous matches, duplicate names.
    """
    images = Path(images)
    labels = Path(labels) if labels is not None else None
    if labels is not None and labels.resolve() == images.resolve():
        labels = None
    for p, flag in ((images, "--images"), (labels, "--labels")):
        if p is not None and not p.exists():
            raise ConfigError(f"{flag} {p} does not exist")
    if images.is_file():
        found = _stack(images, labels)
    elif labels is not None and labels.is_file():
        raise ConfigError(
            f"--images {images} is a folder but --labels {labels} is a file; give two folders "
            "(or one), or two stack files"
        )
    elif labels is None and _is_dsb(images):
        found = _dsb(images)
    elif labels is None:
        return _one_tree(images, label_matcher(label_pattern))
    else:
        return _two_trees(images, labels, label_pattern)
    if label_pattern is not None:
        raise ConfigError(
            f"--label-pattern applies to image folders, not to {found.layout} ({images}); drop it"
        )
    return found


def _stack(images: Path, labels: Path | None) -> Discovery:
    if labels is None:
        if images.suffix.lower() != ".npz":
            raise ConfigError(
                f"--images {images} is a file: give its labels with --labels (only an .npz "
                "holds images and masks together)"
            )
        labels = images
    if labels.is_dir():
        raise ConfigError(f"--images {images} is a file but --labels {labels} is a folder")
    pair = PairSource(images.stem, images, (labels,), "stack")
    return Discovery("stack", images.parent, [pair])


def _is_dsb(root: Path) -> bool:
    return any((d / "images").is_dir() and (d / "masks").is_dir() for d in root.iterdir())


def _dsb(root: Path) -> Discovery:
    """DSB2018: ``<id>/images/<id>.png`` and ``<id>/masks/*.png`` per sample."""
    pairs, unlabelled = [], []
    for sample in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        shown = tree_files(sample / "images") if (sample / "images").is_dir() else []
        if len(shown) != 1:
            raise ConfigError(
                f"{sample}: a DSB2018 sample needs exactly one image in images/, found {len(shown)}"
            )
        masks = tuple(tree_files(sample / "masks")) if (sample / "masks").is_dir() else ()
        if not masks:
            unlabelled.append(shown[0])
            continue
        pairs.append(PairSource(sample.name, shown[0], masks, "dsb"))
    return Discovery("DSB2018 samples (<id>/images, <id>/masks)", root, pairs, unlabelled)


def _not_ph2_regions(paths: list[Path]) -> list[Path]:
    """``paths`` without PH2's colour-region masks (logged when there were any)."""
    kept = [p for p in paths if not PH2_REGION_MASK.fullmatch(p.name)]
    if len(kept) < len(paths):
        example = next(p for p in paths if PH2_REGION_MASK.fullmatch(p.name))
        log.info(
            "%d PH2 colour-region mask(s) left out (not lesion masks), e.g. %s",
            len(paths) - len(kept),
            example,
        )
    return kept


def _one_tree(root: Path, matcher: re.Pattern[str]) -> Discovery:
    images, labels = [], {}
    for path in _not_ph2_regions(tree_files(root)):
        m = matcher.fullmatch(path.name)
        if m:
            labels[path] = (m["stem"],)
        else:
            images.append(path)
    return _match(images, labels, root, "one tree")


def _two_trees(images_root: Path, labels_root: Path, pattern: str | None) -> Discovery:
    matcher = label_matcher(pattern)
    labels: dict[Path, tuple[str, ...]] = {}
    for path in tree_files(labels_root, skip=images_root):
        m = matcher.fullmatch(path.name)
        if pattern is None:  # the same stem, or the stem without its suffix
            labels[path] = (path.stem, m["stem"]) if m else (path.stem,)
        elif m:
            labels[path] = (m["stem"],)
        else:
            log.info("%s: not a label by --label-pattern %r; ignored", path, pattern)
    image_files = _not_ph2_regions(tree_files(images_root, skip=labels_root))
    return _match(image_files, labels, images_root, "two trees")


def unique_stems(images: Sequence[Path]) -> None:
    """Refuse two images with one stem: a pair is known by its image's stem."""
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise ConfigError(
                f"two images share the name {path.stem!r}: {seen[path.stem]} and {path}; "
                "names must be unique (rename one, or point --images at a sub-folder)"
            )
        seen[path.stem] = path


def _match(
    images: list[Path], labels: dict[Path, tuple[str, ...]], root: Path, layout: str
) -> Discovery:
    """Pair each image with the one label filed under one of its :func:`image_keys`."""
    if not images and not labels:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES & {".png", ".tif", ".jpg", ".bmp", ".gif"}))
        raise ConfigError(f"{root}: no image files ({suffixes}, ...) in the folder or below")
    unique_stems(images)
    by_key: dict[str, list[Path]] = defaultdict(list)
    for path, keys in labels.items():
        for key in keys:
            by_key[key].append(path)
    pairs, unlabelled, owner = [], [], {}
    for image in images:
        found = list(dict.fromkeys(lb for key in image_keys(image.stem) for lb in by_key[key]))
        if len(found) > 1:
            raise ConfigError(
                f"{image} matches {len(found)} labels ({', '.join(p.name for p in found)}); "
                "keep one, or choose with --labels FOLDER or --label-pattern '{stem}_SUFFIX.EXT'"
            )
        if not found:
            unlabelled.append(image)
            continue
        if found[0] in owner:
            raise ConfigError(
                f"{found[0]} is the label of two images ({owner[found[0]].name}, {image.name}); "
                "rename one, or choose with --label-pattern"
            )
        owner[found[0]] = image
        pairs.append(PairSource(image.stem, image, (found[0],)))
    orphans = [p for p in labels if p not in owner]
    return Discovery(layout, root, pairs, unlabelled, orphans)


def describe(found: Discovery, *, first: int = 3) -> str:
    """'40 pairs (one tree) in ROOT: IMD006 (a/IMD006.bmp + a/IMD006_lesion.bmp), ...'."""

    def rel(path: Path) -> str:
        return str(path.relative_to(found.root)) if path.is_relative_to(found.root) else path.name

    shown = []
    for p in found.pairs[:first]:
        if p.layout == "dsb":
            shown.append(f"{p.name} (images/{p.image.name} + {len(p.labels)} masks)")
        else:
            shown.append(f"{p.name} ({rel(p.image)} + {rel(p.labels[0])})")
    more = f", ... ({len(found.pairs) - first} more)" if len(found.pairs) > first else ""
    return f"{len(found.pairs)} pair(s) ({found.layout}) in {found.root}: {', '.join(shown)}{more}"


# ------------------------------------------------------------------------------ list files
@dataclass(frozen=True, slots=True)
class ListFile:
    """A ``--list`` file: names, or image/label pairs."""

    path: Path
    names: tuple[str, ...]
    """Names of the pairs, in the file's order (for pairs: the image stems)."""
    pairs: tuple[PairSource, ...] = ()
    """The pairs of an ``image<TAB>label`` list; empty for a name list."""


def read_list(path: Path) -> ListFile:
    """One name a line, or ``image<TAB>label`` a line (relative to the file's folder); blank
    lines and ``#`` comments are ignored. A file must not mix the two forms."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the list ({exc})") from exc
    entries = [(i, ln.split("#", 1)[0].strip()) for i, ln in enumerate(lines, start=1)]
    entries = [(i, e) for i, e in entries if e]
    tabbed = {"\t" in e for _, e in entries}
    if len(tabbed) > 1:
        first = next(i for i, e in entries if ("\t" in e) != ("\t" in entries[0][1]))
        raise ConfigError(
            f"{path}:{first}: the list mixes names and image<TAB>label pairs; use one form"
        )
    if not entries or tabbed == {False}:
        return ListFile(path, tuple(e for _, e in entries))
    pairs = tuple(_list_pair(path, i, e) for i, e in entries)
    return ListFile(path, tuple(p.name for p in pairs), pairs)


def _list_pair(path: Path, line: int, entry: str) -> PairSource:
    fields = [f.strip() for f in entry.split("\t")]
    if len(fields) != 2 or not all(fields):
        raise ConfigError(f"{path}:{line}: expected image<TAB>label, got {len(fields)} fields")
    image, label = (path.parent / f for f in fields)
    for p, what in ((image, "image"), (label, "label")):
        if not p.is_file():
            raise ConfigError(f"{path}:{line}: the {what} {p} does not exist")
    return PairSource(image.stem, image, (label,), "list")
