"""Layer 4: how it runs on Ray, nothing about which algorithm: Ray Train wiring, the
worker feed and collectives, checkpoints, DeepSpeed configs and engines, model loading,
vLLM engine actors and their client, weight sync, reward-model scoring
(docs/architecture.md)."""
