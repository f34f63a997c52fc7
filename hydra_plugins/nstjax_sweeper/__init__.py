"""nstjax's Hydra sweeper: the points of a multirun optimised as batched groups."""
