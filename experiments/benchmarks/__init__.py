"""Benchmarks: each script prints a Markdown table and writes JSON (see README, Performance)."""
