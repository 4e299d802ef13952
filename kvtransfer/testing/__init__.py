"""Harnesses the tests and benchmarks share (processes they start, with every wait bounded)."""
