"""Speed measurement shared by `fastmae bench` and benchmarks/bench_model.py: FLOPs, cases, timing, reports."""
