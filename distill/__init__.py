"""Teacher backends and synthetic data, the MoE student, losses, training, evaluation, export."""
