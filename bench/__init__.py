"""Benchmark harness for ensync-kafka: ``python -m bench.run [--quick] [--profile]``."""
