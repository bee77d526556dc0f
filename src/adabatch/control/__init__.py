"""Deciding and applying: batch-size policies, hyperparameter scaling rules, resizing."""
