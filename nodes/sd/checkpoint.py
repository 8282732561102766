"""Load an SD1.x checkpoint (single-file LDM .safetensors/.ckpt, or a diffusers folder) into
diffusers/transformers modules, reading the file one tensor at a time.

Each module is built on the meta device (no memory, no random init) and then given its weights
with `load_state_dict(assign=True)`, so the only full copy of the weights in RAM is the modules'
own. UNet and VAE are fp32; the text encoder holds fp16-rounded values in fp32 storage, which is
what ComfyUI computes with (fp16 storage, fp32 compute: the same numbers).
"""

from __future__ import annotations

import json
import math
import pickle
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nodes.sd import convert, convert_sdxl
from nodes.sd.convert import UnsupportedCheckpointError

# The reader lives in safetensors_file; re-exported here where loaders have always found it.
from nodes.sd.safetensors_file import CheckpointError as CheckpointError
from nodes.sd.safetensors_file import SafetensorsSource as SafetensorsSource

TE_ROUND_DTYPE = torch.float16


class TensorSource(Protocol):
    """Tensors by name, read lazily."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A state dict already in memory (a .ckpt read with `weights_only=True`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read .ckpt/.pt/.bin with `torch.load(weights_only=True)`: a pickle needing more is refused, not run."""
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)  # old (non-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"'{path.name}' is a pickle that needs code to run to be loaded; nodegraph refuses to run it. "
            "Convert it to .safetensors with a tool you trust"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"'{path.name}' cannot be read as a PyTorch checkpoint ({exc}); download it again"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, dict) and isinstance(data.get("adapter"), dict):
        data = data["adapter"]  # T2I-Adapter pickles saved as {"adapter": state_dict} (comfy/controlnet.py)
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path.name}' does not hold a state dict (found {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def open_source(path: Path) -> TensorSource:
    """The tensors of a model file, chosen by extension."""
    if path.suffix.lower() in (".safetensors", ".sft"):
        return SafetensorsSource(path)
    return DictSource(load_pickle_weights(path))


@dataclass(eq=False)
class LoadedCheckpoint:
    """The modules of one checkpoint, shared (read-only) by every handle made from it.

    `ldm_keys` maps each original LDM key to (component, parameter name), component being "unet",
    "vae", "te" or (SDXL bigG) "te2", so a merged model can be written back in the original layout.
    bigG's keys are views of open_clip keys (`...in_proj_weight#q`, `...text_projection#T`, see
    nodes/sd/convert_sdxl.py). SDXL base: `text_encoder` CLIP-L, `text_encoder_2` bigG; refiner:
    `text_encoder` None.
    """

    path: Path
    family: str
    unet: Any
    text_encoder: Any
    vae: Any
    ldm_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder_2: Any = None


# module -> {LDM key: parameter name}; weak, so a dropped checkpoint is freed. Values hold no module.
_LDM_NAMES: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def ldm_names(module: Any) -> dict[str, str] | None:
    """{original LDM key: parameter name} for a UNet, VAE or text encoder loaded from a single file.

    What a checkpoint writer needs from a handle (`handle.unet`, `clip.text_encoder`, `vae.vae`)
    to save in the original layout; None for modules not loaded from an LDM file (diffusers folders).
    """
    return _LDM_NAMES.get(module)


@contextmanager
def layout_errors(name: str, kind: str, error: type[CheckpointError] = CheckpointError) -> Iterator[None]:
    """What reading a file's key names and shapes raises, as `error` naming the file: a model nodegraph
    does not load (`UnsupportedCheckpointError`, its message kept) or a key every `kind` has, missing."""
    try:
        yield
    except UnsupportedCheckpointError as exc:
        raise error(str(exc)) from exc
    except KeyError as exc:
        raise error(f"'{name}' lacks {exc} that every {kind} has; it is incomplete") from exc


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Load an SD1.x or SDXL-family checkpoint file or diffusers folder.

    Raises:
        CheckpointError: unreadable file, unsupported model family (the message names it), or a
            file whose tensors do not fit the model built from it.
    """
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; put it in models/checkpoints")
    source = open_source(path)
    keys = source.keys()
    if convert_sdxl.is_sdxl(keys):
        from nodes.sd.checkpoint_sdxl import load_sdxl

        return load_sdxl(path, source)
    with layout_errors(path.name, "SD1.x checkpoint"):
        family = convert.detect_family(path.name, keys, source.shape)
        unet_cfg = convert.unet_config(path.name, keys, source.shape)
        unet_map = convert.unet_key_map(keys, source.shape, unet_cfg)
        vae_map = convert.vae_key_map(keys, source.shape)
        te_map = convert.te_key_map(keys)
        clip_cfg = convert.clip_config(keys, source.shape)
        vae_cfg = convert.vae_config(path.name, source.shape)
    with torch.inference_mode(False):
        unet = build_unet(unet_cfg, unet_map, source, path.name)
        vae = build_vae(vae_cfg, vae_map, source, path.name)
        te = build_text_encoder(clip_cfg, te_map, source, path.name)
    ldm_keys = {ldm: ("unet", p) for p, ldm in unet_map.items()}
    ldm_keys |= {ldm: ("vae", p) for p, ldm in vae_map.items()}
    ldm_keys |= {ldm: ("te", p) for p, ldm in te_map.items()}
    for module, mapping in ((unet, unet_map), (vae, vae_map), (te, te_map)):
        _LDM_NAMES[module] = {ldm: p for p, ldm in mapping.items()}
    meta = source.metadata() if isinstance(source, SafetensorsSource) else {}
    return LoadedCheckpoint(path, family, unet, te, vae, ldm_keys, meta)


def build_unet(config: dict[str, Any], key_map: dict[str, str], source: TensorSource, name: str) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return assign_weights(unet, key_map, source, name, "UNet", _to_fp32)


def build_vae(config: dict[str, Any], key_map: dict[str, str], source: TensorSource, name: str) -> Any:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return assign_weights(vae, key_map, source, name, "VAE", _to_fp32)


def build_text_encoder(
    config: dict[str, Any], key_map: dict[str, str], source: TensorSource, name: str
) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(**config))
    te = assign_weights(te, key_map, source, name, "text encoder", _to_fp16_rounded)
    positions = config["max_position_embeddings"]
    # position_ids is a non-persistent buffer: never in the file, still on meta after assignment.
    te.embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)
    return te


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _to_fp16_rounded(t: torch.Tensor) -> torch.Tensor:
    # ComfyUI stores the text encoder in fp16: an fp32 file is rounded once, an fp16 file is exact.
    return t.to(TE_ROUND_DTYPE).to(torch.float32).contiguous()


def assign_weights(
    module: Any,
    key_map: dict[str, str],
    source: TensorSource,
    name: str,
    component: str,
    cast: Callable[[torch.Tensor], torch.Tensor],
) -> Any:
    """Give a meta-device module its weights from `source`, tensor by tensor; strict about every name."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(key_map))
    unexpected = sorted(set(key_map) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"'{name}': its {component} does not match its model layout "
            f"(missing {_few(missing)}, unexpected {_few(unexpected)}); the file is incomplete or"
            " another model type"
        )
    state: dict[str, torch.Tensor] = {}
    for pname, ldm_key in key_map.items():
        tensor = source.get(ldm_key)
        want = expected[pname]
        if tensor.numel() != math.prod(want):
            raise CheckpointError(
                f"'{name}': {ldm_key} has shape {tuple(tensor.shape)}, the {component} needs {want}; "
                "the file is not a consistent checkpoint"
            )
        state[pname] = cast(tensor.reshape(want))
    module.load_state_dict(state, strict=True, assign=True)
    module.eval().requires_grad_(False)
    return module


def _few(names: Iterable[str]) -> str:
    items = list(names)
    shown = ", ".join(items[:3])
    return f"{shown} ... ({len(items)} in all)" if len(items) > 3 else (shown or "none")


def read_json(path: Path) -> dict[str, Any]:
    """A config.json, with a clear error when it is missing or broken."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object")
    return data


class PixelSpaceVae:
    """ComfyUI's "pixel_space" VAE: latents are the pixels themselves (3 channels, no downscaling)."""

    class _Config:
        latent_channels = 3
        scaling_factor = 1.0

    config = _Config()


def load_vae_file(path: Path) -> Any:
    """A standalone VAE file (LDM layout with or without `first_stage_model.`, or diffusers layout)."""
    source = open_source(path)
    keys = source.keys()
    prefix = convert.VAE_PREFIX
    if any(k.startswith("decoder.up_blocks.") for k in keys):  # already diffusers names
        mapping = {
            k: k for k in keys if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
        }
        renamed: TensorSource = source
    else:
        local = [k for k in keys if k.startswith(prefix)] or [prefix + k for k in keys]
        renamed = _Prefixed(source, prefix)
        if not any(k.startswith(f"{prefix}decoder.up.") for k in local):
            raise CheckpointError(f"'{path.name}' is not a VAE (no decoder.up.* keys); pick a VAE file")
        mapping = convert.vae_key_map(local, renamed.shape)

    def shape_of(key: str) -> tuple[int, ...]:
        return (
            renamed.shape(key) if isinstance(renamed, _Prefixed) else source.shape(key.removeprefix(prefix))
        )

    try:
        config = convert.vae_config(path.name, shape_of)
    except (KeyError, UnsupportedCheckpointError) as exc:
        raise CheckpointError(f"'{path.name}' is not a standard SD VAE ({exc}); pick an SD1.x VAE") from exc
    with torch.inference_mode(False):
        return build_vae(config, mapping, renamed, path.name)


class _Prefixed:
    """A source seen with `prefix` on every key (a bare LDM VAE file read like a checkpoint's VAE part)."""

    def __init__(self, inner: TensorSource, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix
        self._has_prefix = any(k.startswith(prefix) for k in inner.keys())

    def _key(self, key: str) -> str:
        return key if self._has_prefix else key.removeprefix(self.prefix)

    def keys(self) -> list[str]:
        return self.inner.keys() if self._has_prefix else [self.prefix + k for k in self.inner.keys()]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self._key(key))

    def get(self, key: str) -> torch.Tensor:
        return self.inner.get(self._key(key))


def weights_variant(folder: Path) -> str | None:
    """ "fp16" when a component folder holds only `*.fp16.safetensors` / `*.fp16.bin` weights (what
    `save_pretrained(variant="fp16")` writes and many SDXL downloads ship), else None (plain names)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    weights = [n for n in names if n.endswith((".safetensors", ".bin", ".index.json"))]
    if any(".fp16." not in n for n in weights) or not weights:
        return None
    return "fp16"


def local_options(folder: Path) -> dict[str, Any]:
    """`from_pretrained` options: this folder's files only (nothing fetched), its weights' variant."""
    return {"local_files_only": True, "variant": weights_variant(folder)}


def load_diffusers_folder(path: Path) -> LoadedCheckpoint:
    """A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, each a config.json and weights).

    Read from disk only (`local_files_only`): the configs are the folder's own, nothing is fetched.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if (path / "text_encoder_2" / "config.json").is_file():
        from nodes.sd.checkpoint_sdxl import load_sdxl_folder

        return load_sdxl_folder(path)
    for sub in ("unet", "vae", "text_encoder"):
        if not (path / sub / "config.json").is_file():
            raise CheckpointError(f"'{path.name}' is not a diffusers folder: {sub}/config.json is missing")
    unet_cfg = read_json(path / "unet" / "config.json")
    if unet_cfg.get("cross_attention_dim") != 768 or unet_cfg.get("use_linear_projection"):
        raise CheckpointError(
            f"'{path.name}' is neither an SD1.x nor an SDXL-family model; nodegraph supports those only"
        )
    try:
        with torch.inference_mode(False):
            unet = UNet2DConditionModel.from_pretrained(path / "unet", **local_options(path / "unet"))
            vae = AutoencoderKL.from_pretrained(path / "vae", **local_options(path / "vae"))
            te = CLIPTextModel.from_pretrained(path / "text_encoder", **local_options(path / "text_encoder"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"'{path.name}': the diffusers folder cannot be loaded ({exc})") from exc
    # transformers types PreTrainedModel.to as a wrapped method mypy cannot call; all three are nn.Modules
    modules: tuple[torch.nn.Module, ...] = (unet, vae, te)
    for module in modules:
        module.to(torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for param in te.parameters():
            param.copy_(_to_fp16_rounded(param))
    return LoadedCheckpoint(path, "sd15", unet, te, vae)
