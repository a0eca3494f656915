"""Layer 6: the training loop every trained model shares (driver and worker halves), the
Task interface and the offline tasks, reference log-probs, the export's model card
(docs/architecture.md)."""
