"""Developer tools: benchmarks (``make bench``)."""
