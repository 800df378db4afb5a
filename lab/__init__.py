"""lab: an LLM-unlearning lab (methods, metrics, gradient-geometry diagnostics)."""
__version__ = "0.1.0"
