"""Validation and sample metrics: the validation loss, Frechet distance, rewards and the digits gold score."""
