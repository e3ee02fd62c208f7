"""Evaluation: metric math (`metrics`), feature extractors (`features`) and the emoji text-to-image harness
(`harness`, `stablexl eval`)."""

from .features import (
    CLIPEmbedder,
    FeatureExtractor,
    InceptionFeatures,
    MiniCLIPFeatures,
)
from .harness import evaluate, summary_lines

__all__ = ["CLIPEmbedder", "FeatureExtractor", "InceptionFeatures", "MiniCLIPFeatures", "evaluate", "summary_lines"]
