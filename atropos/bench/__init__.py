"""Benchmarks: `atropos-sandbox bench`."""
