"""Foundations every stage stands on: errors, atomic writes, output locks, progress callbacks, the worker pool,
strict config loading, file hashing and the one way a stop signal ends a run. Imports nothing of the project."""
