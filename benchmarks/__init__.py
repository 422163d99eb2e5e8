"""Benchmarks: model train-step throughput (`bench_model`) against the Hugging Face reference."""
