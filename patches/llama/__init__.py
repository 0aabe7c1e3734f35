"""Llama: the general path."""
