"""Helpers for tests of tilesegment and of code built on it: synthetic slides written with
tifffile (:mod:`~tilesegment.testing.synthetic`), the reader conformance class
(:mod:`~tilesegment.testing.readers`, needs pytest) and the comparison of instance labelings
made from slightly different class maps (:mod:`~tilesegment.testing.instances`)."""
