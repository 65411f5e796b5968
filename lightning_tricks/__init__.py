"""lightning-tricks: the training tricks practitioners pass around, as tested Lightning parts."""

__version__ = "0.1.0"
