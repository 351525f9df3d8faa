"""The engine: a job's plan, its run on the workers and its output.

Plain values in, results out; a worker process imports only the engine, the
back ends, monitoring and Azure ML's names (docs/architecture.md).
"""
