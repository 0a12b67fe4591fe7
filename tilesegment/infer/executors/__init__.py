"""Executors: the ways a run's units of work get computed. Each implements
:class:`~tilesegment.infer.executors.base.Executor`: in-process (``local``), one worker process
per device (``pool``), or the workers of a dask cluster (``dask``)."""
