"""Layer 5: the evaluation passes, benchmarks and report; does not import rlhf.train
(README: Layout)."""
