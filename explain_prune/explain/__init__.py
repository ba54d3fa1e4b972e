"""Explainability: Eq. 1 relevance of visual tokens to an answer, and layer-0 attention A_v^0."""

from explain_prune.explain.attention import first_layer_attention, first_layer_features
from explain_prune.explain.relevance import relevance

__all__ = ["relevance", "first_layer_attention", "first_layer_features"]
