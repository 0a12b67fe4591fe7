"""What a model declares about its instances: which of its classes are the nucleus interior and
the nucleus boundary, and how far interior seeds may grow (:class:`InstanceSpec`).

Shared by the checkpoint (the ``instances`` field of ``NAME.json``), the output store (the
``instances`` attribute a run copies there) and the post-processing that reads it
(:mod:`tilesegment.postprocess.seeded`). Pure Python: exporting a store imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tilesegment.errors import ModelError

#: Default growth limit (px) of :class:`InstanceSpec`: the boundary class of the training
#: targets is 1 px inside each nucleus plus the 2 px cut between touching ones, and a
#: prediction blurs it to a few px; 8 px covers about four times the trained width.
DEFAULT_MAX_GROWTH_PX = 8
#: Default minimum seed size (px) of :class:`InstanceSpec`: drops specks of interior class.
DEFAULT_MIN_SEED_PX = 4


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """Which classes of a model make instances by seeded growth, and how far seeds grow.

    Seeds are the 4-connected components of the ``interior`` class with at least
    ``min_seed_px`` pixels; each grows through ``interior`` and ``boundary`` pixels by at most
    ``max_growth_px`` steps (4-neighbour, geodesic). See :mod:`tilesegment.postprocess.seeded`.
    """

    interior: int = 1
    """Class id of the nucleus interior (> 0)."""
    boundary: int = 2
    """Class id of the nucleus boundary (> 0, not ``interior``)."""
    max_growth_px: int = DEFAULT_MAX_GROWTH_PX
    """Growth limit in px of the processed level, inclusive (>= 0); a chunk then needs a halo
    of ``max_growth_px + 1 + min_seed_px`` px."""
    min_seed_px: int = DEFAULT_MIN_SEED_PX
    """Interior components with fewer pixels are not seeds (>= 0)."""

    def __post_init__(self) -> None:
        for name in ("interior", "boundary", "max_growth_px", "min_seed_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelError(f"instances: `{name}` ({value!r}) must be an integer >= 0")
        if 0 in (self.interior, self.boundary) or self.interior == self.boundary:
            raise ModelError(
                f"instances: `interior` ({self.interior}) and `boundary` ({self.boundary}) "
                "must be two different classes other than background (0)"
            )

    @property
    def halo_px(self) -> int:
        """Pixels around a chunk that fix its instances (see :attr:`max_growth_px`)."""
        return self.max_growth_px + 1 + self.min_seed_px

    def to_json(self) -> dict[str, int]:
        return {
            "interior": self.interior,
            "boundary": self.boundary,
            "max_growth_px": self.max_growth_px,
            "min_seed_px": self.min_seed_px,
        }

    @classmethod
    def from_json(cls, doc: Any, *, source: str) -> InstanceSpec:
        """Parse the ``instances`` object of a model config or a store's attributes."""
        fields = ("interior", "boundary", "max_growth_px", "min_seed_px")
        if not isinstance(doc, dict) or set(doc) - set(fields):
            raise ModelError(
                f"{source}: `instances` ({doc!r}) must be an object with the keys "
                f"{', '.join(fields)}"
            )
        try:
            return cls(**doc)
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from exc
