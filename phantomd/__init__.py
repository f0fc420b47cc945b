"""phantomd: a phantom-token gateway for Twisted."""

__version__ = "0.1.0"
