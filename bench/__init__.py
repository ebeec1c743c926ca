"""Benchmarks of emalign (see bench/README.md). Not part of the installed package."""
