"""Qwen3: the Llama layout plus per-head RMSNorm on queries and keys (hook_q_normed / hook_k_normed)."""
