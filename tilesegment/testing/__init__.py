"""Helpers for tests of tilesegment and of code built on it: synthetic slides written with
tifffile (:mod:`~tilesegment.testing.synthetic`) and the reader conformance class
(:mod:`~tilesegment.testing.readers`, needs pytest)."""
