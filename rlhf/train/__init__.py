"""Layer 5: the training driver every entry point shares, reference log-probs, online RL's
training side, the export's model card (README: Layout)."""
