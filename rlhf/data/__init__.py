"""Layer 3: where rows come from, their formats, the Ray Data pipelines, the demo data and
the tiny model (docs/architecture.md)."""
