"""WiCore: simulation-first LLM inference research on memory-constrained, heterogeneous hardware."""

__version__ = "0.1.0"
