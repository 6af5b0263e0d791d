"""Benchmark suite (issue 7): run `.venv/bin/python scripts/bench --help`."""
