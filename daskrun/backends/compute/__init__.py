"""Compute back ends: a local cluster, a scheduler address, a batch queue
through dask-jobqueue, a Dask Gateway, a shared warm cluster."""
