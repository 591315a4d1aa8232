"""evomerge: evolutionary model-merge optimizer for LLMs.

Importing the package is cheap: torch-heavy modules, ray, vllm and transformers load where used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
