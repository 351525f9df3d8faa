"""The registry (client only): the public step and pipeline API, the
workspace folder, registered data sets, models and compute targets, run
records. The engine never imports it; a worker never loads it."""
