"""Caption curation building blocks (SynthVLM §3.1): rule-based filters and duplicate removal.

The stage that runs them, with the LLM judge, raw-image CLIPScore and sampling, is synthvlm.stages.curate.
"""

from synthvlm.curation.dedup import DedupConfig, Duplicate, find_duplicates, normalize_text
from synthvlm.curation.heuristics import FlaggedWords, HeuristicFilter, HeuristicsConfig, TextStats

__all__ = [
    "DedupConfig",
    "Duplicate",
    "FlaggedWords",
    "HeuristicFilter",
    "HeuristicsConfig",
    "TextStats",
    "find_duplicates",
    "normalize_text",
]
