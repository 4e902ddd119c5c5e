"""Evaluation: embeddings -> metrics, independent of training."""
