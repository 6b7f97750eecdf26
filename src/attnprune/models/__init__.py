"""Model loading and head layouts."""

from attnprune.models.layouts import ADAPTERS, ArchAdapter, HeadLayout, count_parameters, head_layout
from attnprune.models.loading import DEFAULT_MODEL, PRESETS, LoadedModel, load_model

__all__ = [
    "ADAPTERS", "ArchAdapter", "HeadLayout", "count_parameters", "head_layout",
    "DEFAULT_MODEL", "PRESETS", "LoadedModel", "load_model",
]
