"""``from daskrun.widgets import RunDetails``, as ``azureml.widgets`` reads."""

from daskrun.registry.widgets import RunDetails

__all__ = ["RunDetails"]
