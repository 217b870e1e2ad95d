"""The benchmarks: each runs as `python -m bench.<name>` from the repository root and writes bench/results/<name>.json."""
