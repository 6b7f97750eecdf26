"""Head masks and the hooks that apply them.

A head is masked by zeroing its slice of the *input* of the attention output projection
(``[batch, pos, head * d_head]``) in a forward pre-hook. This equals removing the head,
works with eager and sdpa attention, with ``generate()`` and padding, and with
grouped-query attention at query-head granularity. (Zeroing the *output* of the
projection instead would switch off the whole layer.)

Masks are 1 = active, 0 = pruned, shaped ``(layers, heads)``; a batch of masks is
``(batch, layers, heads)`` and gives every batch row its own mask in one forward pass.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from attnprune.errors import MaskError, UserError
from attnprune.models.layouts import HeadLayout

MASK_FORMAT_VERSION = 1


class HeadMask:
    """An immutable ``(layers, heads)`` boolean mask, True = head active."""

    __slots__ = ("_active",)

    def __init__(self, active: np.ndarray | Sequence[Sequence[bool]]):
        arr = np.asarray(active)
        if arr.ndim != 2:
            raise MaskError(f"A head mask must have shape (layers, heads); got shape {arr.shape}.")
        if arr.dtype != bool:
            if not np.isin(arr, (0, 1)).all():
                raise MaskError("A head mask may only hold 0 (pruned) and 1 (active) values.")
            arr = arr.astype(bool)
        self._active = arr.copy()
        self._active.setflags(write=False)

    # construction -------------------------------------------------------------------------
    @classmethod
    def all_active(cls, n_layers: int, n_heads: int) -> "HeadMask":
        """The unrepaired model: every head active."""
        return cls(np.ones((n_layers, n_heads), dtype=bool))

    @classmethod
    def from_pruned(cls, n_layers: int, n_heads: int, pruned: Iterable[Sequence[int]]) -> "HeadMask":
        """Mask with the listed ``(layer, head)`` pairs pruned."""
        active = np.ones((n_layers, n_heads), dtype=bool)
        for item in pruned:
            if (not isinstance(item, (list, tuple, np.ndarray)) or len(item) != 2
                    or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in item)):
                raise MaskError(f"A pruned head must be a [layer, head] pair of integers; got {item!r}.")
            layer, head = int(item[0]), int(item[1])
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise MaskError(
                    f"Pruned head [{layer}, {head}] is outside the model's {n_layers} layers x {n_heads} heads."
                )
            active[layer, head] = False
        return cls(active)

    @classmethod
    def from_bits(cls, bits: np.ndarray | Sequence[float], n_layers: int, n_heads: int) -> "HeadMask":
        """Inverse of :attr:`bits`."""
        return cls(np.asarray(bits).reshape(n_layers, n_heads))

    @classmethod
    def from_key(cls, key: str, n_layers: int, n_heads: int) -> "HeadMask":
        """Inverse of :attr:`key`."""
        packed = np.frombuffer(bytes.fromhex(key), dtype=np.uint8)
        bits = np.unpackbits(packed)[: n_layers * n_heads].astype(bool)
        return cls(bits.reshape(n_layers, n_heads))

    # views --------------------------------------------------------------------------------
    @property
    def active(self) -> np.ndarray:
        """Read-only boolean array ``(layers, heads)``."""
        return self._active

    @property
    def shape(self) -> tuple[int, int]:
        """``(layers, heads)``."""
        return self._active.shape  # type: ignore[return-value]

    @property
    def bits(self) -> np.ndarray:
        """Flat float32 vector of length ``layers * heads`` (1 = active), the surrogate input."""
        return self._active.reshape(-1).astype(np.float32)

    @property
    def pruned(self) -> list[tuple[int, int]]:
        """Sorted ``(layer, head)`` pairs that are pruned."""
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(~self._active))]

    @property
    def n_pruned(self) -> int:
        """Number of pruned heads."""
        return int((~self._active).sum())

    @property
    def key(self) -> str:
        """Compact hex identity of the mask (packed bits), stable across processes."""
        return np.packbits(self._active.reshape(-1)).tobytes().hex()

    def tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The mask as a ``(layers, heads)`` tensor."""
        return torch.tensor(self._active, dtype=dtype, device=device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeadMask) and self.shape == other.shape and bool((self._active == other._active).all())

    def __hash__(self) -> int:
        return hash((self.shape, self.key))

    def __repr__(self) -> str:
        return f"HeadMask({self.shape[0]}x{self.shape[1]}, pruned={self.pruned})"

    # files --------------------------------------------------------------------------------
    def to_dict(self, model: str | None = None, **metadata) -> dict:
        """The one mask JSON format: model, layers, heads, pruned pairs, optional metadata."""
        out = {
            "format": MASK_FORMAT_VERSION,
            "model": model,
            "layers": self.shape[0],
            "heads": self.shape[1],
            "pruned": [list(p) for p in self.pruned],
        }
        if metadata:
            out["metadata"] = metadata
        return out

    @classmethod
    def from_dict(cls, data: dict, layout: HeadLayout | None = None) -> "HeadMask":
        """Read the mask JSON format; when ``layout`` is given, check the mask fits it."""
        if not isinstance(data, dict) or not {"layers", "heads", "pruned"} <= data.keys():
            raise MaskError("A mask file must be a JSON object with 'layers', 'heads' and 'pruned' fields.")
        n_layers, n_heads = data["layers"], data["heads"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n_layers, n_heads)):
            raise MaskError("The mask file's 'layers' and 'heads' must be positive integers.")
        if layout is not None and (n_layers, n_heads) != layout.shape:
            raise MaskError(
                f"The mask is for {n_layers} layers x {n_heads} heads (model {data.get('model')!r}) "
                f"but this model has {layout.n_layers} x {layout.n_heads}; use a mask made for this model."
            )
        if not isinstance(data["pruned"], list):
            raise MaskError("The mask file's 'pruned' must be a list of [layer, head] pairs.")
        mask = cls.from_pruned(n_layers, n_heads, data["pruned"])
        if layout is not None:
            check_fits(mask, layout)
        return mask

    def save(self, path: str | Path, model: str | None = None, **metadata) -> Path:
        """Write the mask JSON file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(model, **metadata), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, layout: HeadLayout | None = None) -> "HeadMask":
        """Read a mask JSON file, validated against ``layout`` when given."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Mask file {path} does not exist; pass the path of a mask JSON file.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"Mask file {path} cannot be read ({exc.strerror or type(exc).__name__}); check its "
                            "permissions.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MaskError(f"Mask file {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); fix or regenerate it.") from None
        return cls.from_dict(data, layout)


def check_fits(mask: HeadMask, layout: HeadLayout) -> None:
    """Refuse a mask that is not for ``layout``: another grid, or a pruned cell that is no head of the model."""
    if mask.shape != layout.shape:
        raise MaskError(f"The mask has {mask.shape[0]} layers x {mask.shape[1]} heads but the model has "
                        f"{layout.n_layers} x {layout.n_heads}; use a mask made for this model.")
    if layout.is_ragged:
        missing = [(l, h) for l, h in mask.pruned if h >= layout.row_heads[l]]
        if missing:
            l, h = missing[0]
            raise MaskError(f"The mask prunes head [{l}, {h}], but layer {l} of this model has only "
                            f"{layout.row_heads[l]} heads; use a mask made for this model.")


def _as_gate_tensor(mask: HeadMask | torch.Tensor | np.ndarray, layout: HeadLayout) -> torch.Tensor:
    """Validate a mask or batch of masks and return it as a float tensor ``([batch,] L, H)``."""
    if isinstance(mask, HeadMask):
        t = mask.tensor()
    else:
        t = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
        if t.dtype == torch.bool:
            t = t.float()
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != layout.shape:
            raise MaskError(
                f"A mask must have shape (layers, heads) = {layout.shape} or (batch, layers, heads); "
                f"got {tuple(t.shape)}."
            )
        if not torch.isin(t, torch.tensor([0.0, 1.0], dtype=t.dtype)).all():
            raise MaskError("A head mask may only hold 0 (pruned) and 1 (active) values.")
        t = t.float()
    if tuple(t.shape[-2:]) != layout.shape:
        raise MaskError(
            f"The mask has {t.shape[-2]} layers x {t.shape[-1]} heads but the model has "
            f"{layout.n_layers} x {layout.n_heads}; use a mask made for this model."
        )
    if layout.is_ragged and not bool(t[..., ~torch.as_tensor(layout.heads)].all()):
        raise MaskError("The mask prunes a cell past a layer's own heads (this model's layers have "
                        f"{', '.join(map(str, layout.row_heads))} heads); use a mask made for this model.")
    return t


class HeadMasker:
    """Installs one forward pre-hook per attention output projection and swaps masks in place.

    Use as a context manager: hooks are always removed on exit, also after an exception.
    ``set(mask)`` takes a :class:`HeadMask`, a ``(L, H)`` tensor, a ``(B, L, H)`` batch of
    masks (row ``b`` of every forward batch gets mask ``b``), or ``None`` (all active).
    Layers without any pruned head cost one attribute check per forward.
    """

    def __init__(self, model: nn.Module, layout: HeadLayout):
        self.model = model
        self.layout = layout
        self._gates: list[torch.Tensor | None] = [None] * layout.n_layers
        self._handles: list = []

    def set(self, mask: HeadMask | torch.Tensor | np.ndarray | None) -> "HeadMasker":
        """Use ``mask`` for the following forward passes."""
        if mask is None:
            self._gates = [None] * self.layout.n_layers
            return self
        t = _as_gate_tensor(mask, self.layout)
        gates: list[torch.Tensor | None] = []
        for layer, proj in enumerate(self.layout.out_projs):
            per_head = t[..., layer, :self.layout.row_heads[layer]]  # [(batch,) head]
            if bool(per_head.all()):
                gates.append(None)
                continue
            weight = proj.weight
            gate = per_head.repeat_interleave(self.layout.head_dims[layer], dim=-1).to(device=weight.device, dtype=weight.dtype)
            # [head*d] -> broadcast over [batch, pos, head*d]; [B, head*d] -> [B, 1, head*d]
            gates.append(gate if gate.dim() == 1 else gate.unsqueeze(1))
        self._gates = gates
        return self

    def set_gates(self, gates: torch.Tensor) -> "HeadMasker":
        """Use continuous per-head gates ``[L, H]`` or per-row ``[B, L, H]`` (e.g. ones with ``requires_grad``).

        Unlike :meth:`set`, values are not checked and no layer is skipped, so gradients with
        respect to each head's gate flow back through the hooks.
        """
        if tuple(gates.shape[-2:]) != self.layout.shape or gates.dim() not in (2, 3):
            raise MaskError(f"Gates must have shape {self.layout.shape} or (batch, *{self.layout.shape}); "
                            f"got {tuple(gates.shape)}.")
        self._gates = []
        for layer, proj in enumerate(self.layout.out_projs):
            gate = gates[..., layer, :self.layout.row_heads[layer]].repeat_interleave(self.layout.head_dims[layer], dim=-1).to(device=proj.weight.device, dtype=proj.weight.dtype)
            self._gates.append(gate if gate.dim() == 1 else gate.unsqueeze(1))
        return self

    def _hook(self, layer: int):
        def pre_hook(module, args):
            gate = self._gates[layer]
            if gate is None:
                return None
            x = args[0]
            if gate.dim() == 3 and gate.shape[0] != x.shape[0]:
                raise MaskError(
                    f"A batch of {gate.shape[0]} masks was set but the forward batch has {x.shape[0]} rows; "
                    "give one mask per batch row."
                )
            return (x * gate, *args[1:])

        return pre_hook

    def install(self) -> "HeadMasker":
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = [
                proj.register_forward_pre_hook(self._hook(i)) for i, proj in enumerate(self.layout.out_projs)
            ]
        return self

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "HeadMasker":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


def probe_ids(model: nn.Module, tokens: int, device) -> torch.Tensor:
    """``[1, tokens]`` distinct-ish token ids inside the model's vocabulary, for the equality self-checks."""
    config = model.config
    vocab = int(getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 8)
                or 8)
    return (torch.arange(tokens, device=device) * 7 % max(vocab - 1, 1) + 1)[None]


@torch.no_grad()
def check_masking(model: nn.Module, layout: HeadLayout, tokens: int = 4) -> None:
    """Refuse, in one sentence, a model on which masking a head would not do what it says (checked at load).

    On a tiny input, for the first and the last layer and the first of every other head width
    (Gemma-4's full-attention layers) or head count (Laguna): the output projection, with one head
    masked, must see exactly its unmasked input with that head's slice zeroed (so the
    layout's slices are the tensor the projection reads), and the masked model's logits must
    differ from the unmasked ones (so the projection is on the path to the output). Costs
    three forward passes of ``tokens`` tokens.
    """
    from attnprune.errors import ModelLoadError

    ids = probe_ids(model, tokens, layout.out_projs[0].weight.device)
    first_of_kind = {kind: row for row, kind in reversed(list(enumerate(zip(layout.head_dims, layout.row_heads))))}
    last = layout.n_layers - 1
    checks = sorted({(0, 0), (last, layout.row_heads[last] - 1)}
                    | {(r, layout.row_heads[r] - 1 if layout.is_ragged else 0) for r in first_of_kind.values()})
    seen: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module, args):
            seen[layer] = args[0].detach().clone()
        return hook

    with HeadMasker(model, layout) as masker:
        handles = [layout.out_projs[l].register_forward_pre_hook(capture(l)) for l, _ in checks]
        try:
            base_logits = model(input_ids=ids).logits
            base = dict(seen)
            for layer, head in checks:
                masker.set(HeadMask.from_pruned(*layout.shape, [(layer, head)]))
                logits = model(input_ids=ids).logits
                masker.set(None)
                if layer not in base or layer not in seen:
                    raise ModelLoadError(f"Layer {layout.model_layer(layer)}'s attention output projection ({layout.out_proj_path}) is "
                                         "not called in a forward pass of this model, so masking it would do nothing; "
                                         "attnprune cannot mask this architecture.")
                expected = base[layer].clone()
                expected[..., layout.head_slice(layer, head)] = 0
                scale = float(base[layer].abs().max()) or 1.0
                if tuple(seen[layer].shape) != tuple(expected.shape) or \
                        float((seen[layer] - expected).abs().max()) > 1e-5 * scale:
                    raise ModelLoadError(f"Masking head {head} of layer {layout.model_layer(layer)} did not zero exactly its slice of the "
                                         "attention output projection's input on this model, so attnprune cannot "
                                         "mask this architecture correctly.")
                if float(base[layer][..., layout.head_slice(layer, head)].abs().max()) > 0 and \
                        float((logits - base_logits).abs().max()) == 0.0:
                    raise ModelLoadError(f"Masking head {head} of layer {layout.model_layer(layer)} left the logits unchanged although the "
                                         "head's output is not zero, so the masked projection is not on this model's "
                                         "path to the output; attnprune cannot mask this architecture.")
        finally:
            for h in handles:
                h.remove()


@contextmanager
def apply_mask(model: nn.Module, layout: HeadLayout, mask: HeadMask | torch.Tensor | None) -> Iterator[HeadMasker]:
    """Context manager: run ``model`` with ``mask`` applied; hooks are removed on exit."""
    with HeadMasker(model, layout) as masker:
        masker.set(mask)
        yield masker
