"""``python -m tilesegment`` runs the command line."""

from __future__ import annotations

from tilesegment.cli import main

if __name__ == "__main__":
    main()
