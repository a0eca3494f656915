"""Layer 7: online RL's flow, a module per role (coordinator, episodes, prompt_stream,
feed, critic, task, setup); docs/online-rl.md and docs/architecture.md."""
