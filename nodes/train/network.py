"""LoRA modules for training, as kohya's `networks/lora.py` `LoRAModule` builds them.

Each adapted layer gets `down` (in -> rank) and `up` (rank -> out), initialised kohya's way (down
Kaiming-uniform with a=sqrt(5), up zeros, so training starts from the unchanged model), and adds
`up(down(x)) * alpha / rank` to the layer's output through a forward hook (the base weights are
never touched). 1x1 convolutions (SD1.x `proj_in`/`proj_out`) get 1x1 convolutions.

Names are kohya's: `lora_unet_` + the diffusers module path with `.` -> `_`, and
`lora_te_text_model_` + the CLIP module path, which is what the LoRA loader maps. For SDXL kohya
trains its own SGM-layout UNet, so the UNet names are the original (LDM) module paths
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and the two text encoders are
`lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP bigG) (`sdxl_train_network.py`, `networks/lora.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from nodes.sd.lora.keymap import diffusers_to_ldm

# Modules inside each UNet transformer (kohya: Linear and 1x1 Conv2d in Transformer2DModel).
UNET_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
)  # fmt: skip
# kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3: blocks whose layers LoCon adapts
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


class LoRAModule(nn.Module):
    """One low-rank adapter: `out += up(down(x)) * multiplier * alpha / rank`."""

    alpha: torch.Tensor  # a registered buffer (saved as `<name>.alpha`)

    def __init__(
        self, name: str, layer: nn.Module, rank: int, alpha: float, dropout: float | None = None
    ) -> None:
        super().__init__()
        self.lora_name = name
        self.rank = rank
        self.dropout = dropout
        if isinstance(layer, nn.Conv2d):
            # kohya: down copies the layer's kernel, stride and padding (LoCon for 3x3); up is 1x1
            kernel, stride = cast(tuple[int, int], layer.kernel_size), cast(tuple[int, int], layer.stride)
            padding = cast(tuple[int, int], layer.padding)
            self.lora_down: nn.Conv2d | nn.Linear = nn.Conv2d(
                layer.in_channels, rank, kernel, stride, padding, bias=False
            )
            self.lora_up: nn.Conv2d | nn.Linear = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        elif isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            raise ValueError(f"{name}: cannot adapt a {type(layer).__name__}")
        alpha = float(rank) if not alpha else float(alpha)
        self.scale = alpha / rank
        self.register_buffer("alpha", torch.tensor(alpha))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = 1.0

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lx = self.lora_down(x)
        if self.dropout and self.training:  # kohya's network_dropout: on the down output
            lx = F.dropout(lx, p=self.dropout)
        out: torch.Tensor = self.lora_up(lx)
        return out * (self.multiplier * self.scale)


class LoRANetwork(nn.Module):
    """The adapters of one model (UNet and, optionally, text encoder), hooked into its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.unet_loras = nn.ModuleList()
        self.te_loras = nn.ModuleList()
        self._hooks: list[Any] = []
        self._targets: dict[str, nn.Module] = {}

    @classmethod
    def create(
        cls,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        rank: int,
        alpha: float,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        dropout: float | None = None,
        text_encoder_2: nn.Module | None = None,
        sdxl: bool = False,
    ) -> LoRANetwork:
        """Adapters as kohya's `LoRANetwork.create_modules`.

        UNet: every Linear and 1x1 Conv2d inside a transformer; with `conv_rank` (LoCon) also the
        layers of ResNet blocks and down/up-samplers (3x3 convolutions with `conv_rank`/`conv_alpha`,
        default alpha 1 as kohya). Text encoder (when given): CLIP attention and MLP projections.
        `sdxl`: kohya's SDXL names (LDM UNet paths; `text_encoder` CLIP-L as `lora_te1_`,
        `text_encoder_2` bigG as `lora_te2_`).
        """
        if rank < 1:
            raise ValueError(f"rank {rank} must be at least 1")
        net = cls()
        config = getattr(unet, "config", None)

        def unet_name(path: str) -> str:
            if not sdxl:
                return unet_lora_name(path)
            ldm = diffusers_to_ldm(path, config)
            if ldm is None:
                raise ValueError(f"UNet module {path!r} has no original-layout name")
            return unet_lora_name(ldm)

        for path, layer in unet.named_modules():
            if ".attentions." in f".{path}" and f".{path}".endswith(tuple("." + t for t in UNET_TARGETS)):
                net._add(net.unet_loras, LoRAModule(unet_name(path), layer, rank, alpha, dropout), layer)
        if conv_rank:
            for path, block in unet.named_modules():
                if type(block).__name__ not in CONV_BLOCKS:
                    continue
                for child, layer in block.named_modules():
                    if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
                        r, a = conv_rank, 1.0 if conv_alpha is None else conv_alpha
                    elif isinstance(layer, nn.Linear | nn.Conv2d):
                        r, a = rank, alpha
                    else:
                        continue
                    name = unet_name(f"{path}.{child}")
                    net._add(net.unet_loras, LoRAModule(name, layer, r, a, dropout), layer)
        encoders = [("lora_te_", text_encoder)]
        if sdxl:
            encoders = [("lora_te1_", text_encoder), ("lora_te2_", text_encoder_2)]
        for prefix, te in encoders:
            for path, layer in te.named_modules() if te is not None else ():
                if isinstance(layer, nn.Linear) and ".layers." in path and path.endswith(TE_TARGETS):
                    lora = LoRAModule(te_lora_name(path, prefix), layer, rank, alpha, dropout)
                    net._add(net.te_loras, lora, layer)
        return net

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        """Start from a saved LoRA (kohya's `--network_weights`, which loads with strict=False).

        Modules the file lacks keep their fresh init; returns how many were loaded.

        Raises:
            ValueError: no module matched (another model), or a shape differs (another rank).
        """
        loaded = 0
        with torch.no_grad():
            for lora in self.loras():
                keys = [f"{lora.lora_name}.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha")]
                if not all(k in tensors for k in keys):
                    continue
                for key, mine in zip(
                    keys, (lora.lora_down.weight, lora.lora_up.weight, lora.alpha), strict=True
                ):
                    if tuple(tensors[key].shape) != tuple(mine.shape):
                        raise ValueError(
                            f"{key}: shape {tuple(tensors[key].shape)} in the file, {tuple(mine.shape)} here "
                            "(another rank or model)"
                        )
                    mine.copy_(tensors[key])
                lora.scale = float(lora.alpha) / lora.rank
                loaded += 1
        if not loaded:
            raise ValueError("none of its modules matches this model's adapters")
        return loaded

    def _add(self, into: nn.ModuleList, lora: LoRAModule, layer: nn.Module) -> None:
        into.append(lora)
        self._targets[lora.lora_name] = layer  # a plain dict: the adapted layer is not our submodule

    def apply_to(self) -> None:
        """Hook every adapter into its layer (idempotent)."""
        self.remove()
        for lora in self.loras():
            layer = self._targets[lora.lora_name]
            self._hooks.append(layer.register_forward_hook(_hook(lora)))

    def remove(self) -> None:
        """Unhook every adapter: the model computes exactly as before."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def loras(self) -> Iterator[LoRAModule]:
        for module in (*self.unet_loras, *self.te_loras):
            assert isinstance(module, LoRAModule)
            yield module

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict[str, Any]]:
        """The optimizer's groups; one whose rate is 0 is left out ("NO LR skipping!" in kohya's
        networks/lora.py `assemble_params`), so `--text_encoder_lr 0` trains the UNet alone."""
        groups: list[dict[str, Any]] = []
        for loras, lr in ((self.unet_loras, unet_lr), (self.te_loras, te_lr)):
            if len(loras) and lr != 0:
                groups.append({"params": list(loras.parameters()), "lr": lr})
        return groups

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """kohya keys: `<lora_name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.loras():
            out[f"{lora.lora_name}.lora_down.weight"] = lora.lora_down.weight.detach()
            out[f"{lora.lora_name}.lora_up.weight"] = lora.lora_up.weight.detach()
            out[f"{lora.lora_name}.alpha"] = lora.alpha.detach()
        return out


def _hook(lora: LoRAModule) -> Any:
    def hook(layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out + lora.delta(args[0])

    return hook


def unet_lora_name(path: str) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in` (kohya)."""
    return "lora_unet_" + path.replace(".", "_")


def te_lora_name(path: str, prefix: str = "lora_te_") -> str:
    """`text_model.encoder.layers.0.mlp.fc1` (with or without `text_model.`) -> `lora_te_text_model_...`
    (SDXL: `lora_te1_...` for CLIP-L, `lora_te2_...` for bigG)."""
    full = path if path.startswith("text_model.") else f"text_model.{path}"
    return prefix + full.replace(".", "_")
