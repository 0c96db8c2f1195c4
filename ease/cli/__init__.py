"""Command-line entry points: ``ease-experiments`` and ``ease-generate``."""
