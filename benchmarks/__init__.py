"""Stage benchmarks: each runs a stage and its anchor on the same input and prints the ratio.

Run ``python -m benchmarks.bench_download`` and ``python -m benchmarks.bench_faces`` (or ``make bench``).
"""
