"""Fitness: tasks turn items into requests, backends answer them in batches, scorers grade the answers."""
