"""prefopt: multi-response preference optimization for LLMs."""

__version__ = "0.1.0"
