"""Local training of a client's LoRA, centralized reference runs, checkpoints and a client's own state."""
