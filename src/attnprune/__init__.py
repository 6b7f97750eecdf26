"""attnprune: repair social bias in causal language models by pruning attention heads.

Implements Attention Pruning (Dasu et al., arXiv 2503.15815): sample head masks, measure
bias and perplexity on the real model, fit surrogate networks, anneal on the surrogates,
validate on the real model and export the repaired model.
"""

__version__ = "0.1.0"

from attnprune.errors import MaskError, ModelLoadError, UserError  # noqa: E402
from attnprune.heads import HeadMask, HeadMasker, apply_mask  # noqa: E402
from attnprune.models import DEFAULT_MODEL, HeadLayout, LoadedModel, head_layout, load_model  # noqa: E402

__all__ = [
    "__version__", "MaskError", "ModelLoadError", "UserError", "HeadMask", "HeadMasker", "apply_mask",
    "DEFAULT_MODEL", "HeadLayout", "LoadedModel", "head_layout", "load_model",
]
