"""Benchmarks: each script prints a Markdown table and writes JSON (see ``docs/performance.md``)."""
