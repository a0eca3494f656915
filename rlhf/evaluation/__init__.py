"""Layer 6: the evaluation library (setup, engines, judges, comparison, benchmarks,
general tasks, report); does not import rlhf.train (docs/architecture.md)."""
