"""Transferability: rank candidate bases (and layers) for a dataset without fine-tuning."""
