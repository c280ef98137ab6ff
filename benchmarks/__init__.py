"""Speed and memory benchmarks of vitkd against reference-style loops (``make bench``)."""
