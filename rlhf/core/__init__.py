"""Layer 2: maths and RL interfaces, torch and the standard library only
(docs/architecture.md)."""
