"""Loading the base LLM (whole or in parts), the tiny demo model, LoRA state, heads and speed options."""
