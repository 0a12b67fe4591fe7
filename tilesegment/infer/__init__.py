"""Inference over a whole slide, in data-flow order: options (what to do), source (which
pixels), plan (tiles, chunks, units), predict (the model on a batch), stream (read -> predict ->
assemble -> write, per unit), record (each written chunk made durable), executors (in-process,
worker pool, dask), report (what happened), run (:func:`~tilesegment.infer.run.run_slide`)."""
