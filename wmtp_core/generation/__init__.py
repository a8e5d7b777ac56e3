"""Generation with the trained model: plain and self-speculative decoding, and per-head analysis. torch only: no
prefect, no mlflow; reads wmtp_core.models and wmtp_core.data."""

from wmtp_core.generation.generate import generate
from wmtp_core.generation.head_analysis import head_accuracy
from wmtp_core.generation.settings import DecodingStats, Generation, SamplingSettings

__all__ = ["DecodingStats", "Generation", "SamplingSettings", "generate", "head_accuracy"]
