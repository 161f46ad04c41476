"""Development helpers for tests, demos and benchmarks (not part of the shipped package)."""
