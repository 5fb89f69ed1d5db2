"""The label convention shared by the data pipeline, the synthetic tasks and the loss."""

IGNORE_INDEX = -100
"""Label of a position that takes no loss (``torch.nn.functional.cross_entropy``'s default)."""
