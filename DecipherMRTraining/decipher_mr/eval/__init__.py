"""Evaluation: cross-modal retrieval, zero-shot classification by text prompts, and their reports."""
