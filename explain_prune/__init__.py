"""explain_prune: visual-token compression for multimodal LLMs from an explainability perspective."""

__version__ = "0.1.0"
