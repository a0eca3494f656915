"""What one kind of training computes per micro-batch (the Task interface in base.py;
DPO, the reward model and SFT beside it). Online RL's task is rlhf/online/task.py."""
