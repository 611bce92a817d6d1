"""Evaluation of a model trained on a selection: LM losses, zero-shot tasks, seeds and statistics."""
