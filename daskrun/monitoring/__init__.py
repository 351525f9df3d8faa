"""Watching a job: the log folder, the terminal, the dashboard page, the
report, resources over time and the forecast."""
