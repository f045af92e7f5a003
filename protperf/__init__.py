"""protperf: protein language models on Performers (FAVOR+ attention)."""

__version__ = "0.1.0"
