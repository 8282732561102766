"""Every node nodegraph offers, listed explicitly: each module below exports `NODES`."""

from __future__ import annotations

from nodegraph.env import Environment
from nodegraph.node import Node


def all_nodes() -> list[type[Node]]:
    """The node classes, in the order the canvas lists them."""
    from nodes import (
        conditioning,
        conditioning_area,
        conditioning_combine,
        custom_sampling,
        image,
        image_transform,
        inpaint,
        latent,
        latent_batch,
        latent_transform,
        loaders,
        lora,
        merge,
        model_advanced,
        outpaint,
        sampling,
        sigmas,
        train_node,
        upscale_model,
        vae_tiled,
    )

    modules = (
        loaders,
        lora,
        merge,
        conditioning,
        conditioning_combine,
        conditioning_area,
        sampling,
        custom_sampling,
        sigmas,
        model_advanced,
        latent,
        latent_transform,
        latent_batch,
        inpaint,
        image,
        vae_tiled,
        image_transform,
        outpaint,
        upscale_model,
        train_node,
    )
    return [cls for module in modules for cls in module.NODES]


def routes(env: Environment) -> list[object]:
    """Extra HTTP routes the canvas extension needs (LoRA metadata), as aiohttp RouteDefs."""
    from nodes import web_routes

    return list(web_routes.routes(env))


def warm_up() -> None:
    """Import the model libraries now (seconds of work), so the first prompt does not pay for it
    inside the server's worker thread while holding the GIL."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from nodes.sd import checkpoint, convert  # noqa: F401
