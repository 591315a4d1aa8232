"""Search: spaces (genome <-> recipe), optimizers (ask/tell), the Pareto archive, the journal and the run loop."""
