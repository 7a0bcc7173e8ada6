"""Reward guidance: the RL term and the reward models it differentiates through."""
