"""Layer 5: everything a run writes or prints: the run directory, the metrics log, the
trackers, the console, the curves, the redaction of secrets (docs/architecture.md)."""
