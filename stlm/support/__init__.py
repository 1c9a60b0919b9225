"""Plumbing with no model knowledge: atomic writes, optional extras, the GPU environment, progress."""
