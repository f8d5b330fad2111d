"""Datasets (the built-in ShapesVQA generator) and accuracy metrics."""
