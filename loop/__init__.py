"""A hand-written Accelerate training loop for Korean dialogue summarization."""

__version__ = "0.1.0"
