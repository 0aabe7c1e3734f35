"""Qwen2: the Llama layout (sliding windows come in through the mask the model builds)."""
