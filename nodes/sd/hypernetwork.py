"""A1111 hypernetworks (.pt) as ComfyUI applies them (comfy_extras/nodes_hypernetwork.py).

The file is read with `torch.load(weights_only=True)`: plain dicts, lists, tensors, strings and
bools only; a pickle that needs code is refused. Integer keys are attention input widths, each
with a [k, v] pair of small MLPs. ComfyUI's rules for building them, kept exactly:

* the `.weight` keys of each state dict, in dict order, are the layers: a Linear, then the
  activation unless it is the last layer (or `activate_output`), then a LayerNorm when
  `is_layer_norm` (which consumes the next `.weight`, so with layer norms the last Linear still
  gets its activation), then Dropout(0.3) when `use_dropout` (not after the last two layers unless
  `last_layer_dropout`); ComfyUI never puts these modules in eval mode, so its dropout is live;
* `swish` is Hardswish; an unknown activation makes ComfyUI leave the model unchanged.

At each attention of the UNet (self and cross), before the k/v projections, the module for the
width of the attention's k input gives `k + hn_k(k)·strength` and `v + hn_v(v)·strength`; q is
untouched. Several hypernetworks apply in node order, each on the previous one's k and v.
"""

from __future__ import annotations

import pickle
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nodegraph.primitives import LruCache

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}


class HypernetworkError(ValueError):
    """A hypernetwork file that cannot be read or built (the message names the file)."""


@dataclass(frozen=True)
class HypernetworkRef:
    """One HypernetworkLoader on a MODEL: the file (and its stamp) and the strength."""

    path: Path
    stamp: tuple[int, int]
    strength: float
    name: str


class Hypernetwork:
    """{attention width: (hn_k, hn_v)} MLPs, fp32, built by ComfyUI's rules (training mode kept)."""

    def __init__(self, modules: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]]) -> None:
        self.modules = modules

    def to(self, device: torch.device, dtype: torch.dtype) -> Hypernetwork:
        for pair in self.modules.values():
            for module in pair:
                module.to(device=device, dtype=dtype)
        return self


def read_file(path: Path) -> dict[Any, Any]:
    """The .pt's top-level dict, loaded weights-only."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HypernetworkError(
            f"'{path.name}' is a pickle that needs code to run to be loaded; nodegraph refuses to run it"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise HypernetworkError(f"'{path.name}' cannot be read as a hypernetwork ({exc})") from exc
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        raise HypernetworkError(
            f"'{path.name}' is not an A1111 hypernetwork (no attention-width keys); put hypernetworks "
            "(.pt) in models/hypernetworks"
        )
    return data


def _layers(sd: Any, activation: str, flags: dict[str, bool], where: str) -> torch.nn.Sequential:
    """One k or v MLP, exactly as load_hypernetwork_patch assembles it."""
    if not isinstance(sd, dict):
        raise HypernetworkError(f"{where}: expected a state dict of Linear layers")
    linears = [k[: -len(".weight")] for k in sd if isinstance(k, str) and k.endswith(".weight")]
    layers: list[torch.nn.Module] = []
    i = 0
    while i < len(linears):
        last, penultimate = i == len(linears) - 1, i == len(linears) - 2
        weight, bias = (
            _tensor(sd, f"{linears[i]}.weight", 2, where),
            _tensor(sd, f"{linears[i]}.bias", 1, where),
        )
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": bias})
        layers.append(layer)
        if activation != "linear" and (not last or flags["activate_output"]):
            layers.append(ACTIVATIONS[activation]())
        if flags["is_layer_norm"]:
            i += 1
            if i >= len(linears):
                raise HypernetworkError(f"{where}: is_layer_norm is set but the last Linear has no LayerNorm")
            ln_w, ln_b = (
                _tensor(sd, f"{linears[i]}.weight", 1, where),
                _tensor(sd, f"{linears[i]}.bias", 1, where),
            )
            norm = torch.nn.LayerNorm(ln_w.shape[0])
            norm.load_state_dict({"weight": ln_w, "bias": ln_b})
            layers.append(norm)
        if flags["use_dropout"] and not last and (not penultimate or flags["last_layer_dropout"]):
            layers.append(torch.nn.Dropout(p=0.3))
        i += 1
    return torch.nn.Sequential(*layers)


def _tensor(sd: dict[Any, Any], key: str, ndim: int, where: str) -> torch.Tensor:
    value = sd.get(key)
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        raise HypernetworkError(f"{where}: {key} is missing or not a {ndim}-d tensor")
    return value.float()


def build(path: Path) -> Hypernetwork | None:
    """The hypernetwork in `path`; None for an activation ComfyUI does not know (it skips the file)."""
    sd = read_file(path)
    activation = sd.get("activation_func", "linear")
    if activation not in ACTIVATIONS:
        return None
    flags = {
        k: bool(sd.get(k, False))
        for k in ("is_layer_norm", "use_dropout", "activate_output", "last_layer_dropout")
    }
    modules: dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]] = {}
    with torch.inference_mode(False):
        for dim, pair in sd.items():
            if not isinstance(dim, int):
                continue
            where = f"'{path.name}' width {dim}"
            if not isinstance(pair, (list, tuple)) or len(pair) < 2:
                raise HypernetworkError(f"{where}: expected a [k, v] pair of state dicts")
            k, v = (_layers(pair[i], activation, flags, f"{where} {'kv'[i]}") for i in (0, 1))
            modules[dim] = (k.requires_grad_(False), v.requires_grad_(False))
    return Hypernetwork(modules)


_CACHE: LruCache[tuple[str, tuple[int, int]], Hypernetwork | None] = LruCache(max_entries=8)
_CACHE_LOCK = threading.Lock()


def loaded(ref: HypernetworkRef) -> Hypernetwork | None:
    """The built hypernetwork of a ref, built once per file version."""
    key = (str(ref.path), ref.stamp)
    with _CACHE_LOCK:
        if key in _CACHE.keys():
            return _CACHE.get(key)
        found = build(ref.path)
        _CACHE.put(key, found)
        return found


def unknown_activation(path: Path) -> str | None:
    """The activation name when ComfyUI would skip this file for it, else None."""
    activation = read_file(path).get("activation_func", "linear")
    return None if activation in ACTIVATIONS else str(activation)


Patch = tuple[Hypernetwork, float]


def patch_kv(patches: Sequence[Patch], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hypernetwork_patch.__call__ for each patch in order: the module for k's width, if any."""
    for net, strength in patches:
        pair = net.modules.get(k.shape[-1])
        if pair is not None:
            k, v = k + pair[0](k) * strength, v + pair[1](v) * strength
    return k, v


class HypernetworkProcessor:
    """diffusers' AttnProcessor2_0 with the k and v inputs patched first (the SD UNet's attentions:
    3-d input, no norms on q/k or cross, no residual, no mask)."""

    def __init__(self, patches: Sequence[Patch], inner: Any) -> None:
        self.patches, self.inner = list(patches), inner

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_in, v_in = patch_kv(self.patches, context, context)
        plain = k_in is context and v_in is context
        if plain or hidden_states.ndim != 3 or attention_mask is not None or attn.norm_cross:
            plain_out: torch.Tensor = self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs
            )
            return plain_out
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(k_in), attn.to_v(v_in)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        result: torch.Tensor = out / attn.rescale_output_factor
        return result


@contextmanager
def hypernetworks_applied(unet: Any, refs: Sequence[HypernetworkRef]) -> Iterator[Any]:
    """Make the UNet's attentions compute with `refs` for the duration of the block, then restore."""
    patches: list[Patch] = []
    for ref in refs:
        net = loaded(ref)
        if net is not None and ref.strength != 0.0:  # strength 0 adds exactly nothing
            first = next(unet.parameters())
            patches.append((net.to(first.device, first.dtype), ref.strength))
    if not patches:
        yield unet
        return
    before = dict(unet.attn_processors)
    unet.set_attn_processor({name: HypernetworkProcessor(patches, p) for name, p in before.items()})
    try:
        yield unet
    finally:
        unet.set_attn_processor(before)
