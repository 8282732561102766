"""Which custom-node pack provides a node type nodegraph does not have: the message for a workflow
that needs one names the pack, so the user knows what the workflow came from and what to replace.

A small table of the packs shared workflows use most (by exact id, then by their naming patterns);
an unknown id gets no pack. Torch-free: the loader and the validator both use it.
"""

from __future__ import annotations

from collections.abc import Iterable

# Exact node ids of packs whose ids have no pattern of their own.
_EXACT: dict[str, str] = {
    **dict.fromkeys(
        (
            "Efficient Loader",
            "Eff. Loader SDXL",
            "KSampler (Efficient)",
            "KSampler Adv. (Efficient)",
            "KSampler SDXL (Eff.)",
            "XY Plot",
            "HighRes-Fix Script",
            "Noise Control Script",
            "Tiled Upscaler Script",
            "Control Net Stacker",
            "Apply ControlNet Stack",
            "LoRA Stack to String converter",
            "Unpack SDXL Tuple",
            "Pack SDXL Tuple",
            "Image Overlay",
            "Evaluate Integers",
            "Evaluate Strings",
        ),
        "efficiency-nodes-comfyui",
    ),
    **dict.fromkeys(
        (
            "FaceDetailer",
            "FaceDetailerPipe",
            "DetailerForEach",
            "DetailerForEachDebug",
            "SAMLoader",
            "BboxDetectorSEGS",
            "SegmDetectorSEGS",
            "SEGSPreview",
            "SEGSPaste",
            "ImpactWildcardProcessor",
            "ImpactWildcardEncode",
            "ToBasicPipe",
            "FromBasicPipe",
            "BasicPipeToDetailerPipe",
            "ImpactSwitch",
            "ImpactInt",
            "MaskToSEGS",
            "SEGSToImageList",
            "ImageListToImageBatch",
            "PreviewBridge",
        ),
        "ComfyUI-Impact-Pack",
    ),
    "UltralyticsDetectorProvider": "ComfyUI-Impact-Subpack",
    **dict.fromkeys(
        (
            "IPAdapter",
            "IPAdapterAdvanced",
            "IPAdapterModelLoader",
            "IPAdapterUnifiedLoader",
            "IPAdapterUnifiedLoaderFaceID",
            "IPAdapterFaceID",
            "IPAdapterEncoder",
            "IPAdapterEmbeds",
            "IPAdapterApply",
            "IPAdapterApplyFaceID",
            "IPAdapterBatch",
            "IPAdapterTiled",
            "PrepImageForClipVision",
        ),
        "ComfyUI_IPAdapter_plus",
    ),
    **dict.fromkeys(
        (
            "CannyEdgePreprocessor",
            "OpenposePreprocessor",
            "DWPreprocessor",
            "DepthAnythingPreprocessor",
            "DepthAnythingV2Preprocessor",
            "MiDaS-DepthMapPreprocessor",
            "Zoe-DepthMapPreprocessor",
            "LineArtPreprocessor",
            "AnimeLineArtPreprocessor",
            "HEDPreprocessor",
            "PiDiNetPreprocessor",
            "TilePreprocessor",
            "AIO_Preprocessor",
            "ScribblePreprocessor",
            "M-LSDPreprocessor",
            "NormalMapSimplePreprocessor",
            "BAE-NormalMapPreprocessor",
            "OneFormer-COCO-SemSegPreprocessor",
        ),
        "comfyui_controlnet_aux",
    ),
    **dict.fromkeys(
        (
            "GetNode",
            "SetNode",
            "ImageResizeKJ",
            "ColorMatch",
            "GrowMaskWithBlur",
            "INTConstant",
            "FloatConstant",
            "StringConstant",
            "StringConstantMultiline",
            "ConditioningMultiCombine",
            "ImageConcanate",
            "GetImageSizeAndCount",
            "ResizeMask",
            "CreateShapeMask",
        ),
        "ComfyUI-KJNodes",
    ),
    **dict.fromkeys(("UltimateSDUpscale", "UltimateSDUpscaleNoUpscale"), "ComfyUI_UltimateSDUpscale"),
    **dict.fromkeys(
        ("ControlNetLoaderAdvanced", "DiffControlNetLoaderAdvanced"), "ComfyUI-Advanced-ControlNet"
    ),
    "BNK_CLIPTextEncodeAdvanced": "ComfyUI_ADV_CLIP_emb",
    **dict.fromkeys(("UnetLoaderGGUF", "CLIPLoaderGGUF", "DualCLIPLoaderGGUF"), "ComfyUI-GGUF"),
    **dict.fromkeys(
        ("Anything Everywhere", "Anything Everywhere3", "Prompts Everywhere"), "cg-use-everywhere"
    ),
    **dict.fromkeys(
        (
            "Image Resize",
            "Image Save",
            "Text Concatenate",
            "Text Multiline",
            "Text String",
            "Number to Text",
            "Image Blank",
            "Load Image Batch",
            "CLIPTextEncode (NSP)",
            "Image Filter Adjustments",
            "Image Rembg (Remove Background)",
            "Text Parse A1111 Embeddings",
            "Checkpoint Loader",
        ),
        "was-node-suite-comfyui",
    ),
    **dict.fromkeys(("Image Saver", "Checkpoint Selector", "Sampler Selector"), "comfy-image-saver"),
}

# (how an id starts or ends, the pack): the packs that mark every id they add.
_PREFIXES = (
    ("CR ", "ComfyUI_Comfyroll_CustomNodes"),
    ("easy ", "ComfyUI-Easy-Use"),
    ("VHS_", "ComfyUI-VideoHelperSuite"),
    ("ADE_", "ComfyUI-AnimateDiff-Evolved"),
    ("ACN_", "ComfyUI-Advanced-ControlNet"),
    ("CM_", "ComfyMath"),
    ("Impact", "ComfyUI-Impact-Pack"),
)
_SUFFIXES = (
    ("(rgthree)", "rgthree-comfy"),
    ("|pysssss", "ComfyUI-Custom-Scripts"),
    (" //Inspire", "ComfyUI-Inspire-Pack"),
    ("[Crystools]", "ComfyUI-Crystools"),
    ("+", "ComfyUI_essentials"),
)

# ComfyUI core nodes nodegraph may not have (yet): their message says so instead of naming a pack.
CORE = frozenset(
    {
        "ControlNetLoader", "DiffControlNetLoader", "ControlNetApply", "ControlNetApplyAdvanced",
        "CLIPVisionLoader", "CLIPVisionEncode", "unCLIPConditioning", "unCLIPCheckpointLoader",
        "HypernetworkLoader", "StyleModelLoader", "StyleModelApply", "GLIGENLoader", "GLIGENTextBoxApply",
        "UNETLoader", "CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "Canny",
        "ImageOnlyCheckpointLoader",
        "SVD_img2vid_Conditioning", "VideoLinearCFGGuidance", "ModelSamplingFlux", "FluxGuidance",
        "LoadImageOutput", "UpscaleModelLoader", "PhotoMakerLoader", "InstructPixToPixConditioning",
        "CheckpointLoader", "ModelMergeSD1", "ModelMergeSD2", "ModelMergeSDXL", "ModelSamplingContinuousEDM",
        "SelfAttentionGuidance", "DifferentialDiffusion", "PerpNeg", "PerpNegGuider",
    }
)  # fmt: skip


def pack_of(class_type: str) -> str | None:
    """The custom-node pack that provides `class_type`, when this table knows it."""
    found = _EXACT.get(class_type)
    if found is not None:
        return found
    for prefix, pack in _PREFIXES:
        if class_type.startswith(prefix):
            return pack
    for suffix, pack in _SUFFIXES:
        if class_type.endswith(suffix):
            return pack
    return None


def describe_missing(class_types: Iterable[str]) -> str:
    """One line per missing node type, in first-seen order, each with where it comes from."""
    lines = []
    for class_type in dict.fromkeys(class_types):
        pack = pack_of(class_type)
        if pack is not None:
            lines.append(f"'{class_type}' (from the custom node pack {pack})")
        elif class_type in CORE:
            lines.append(f"'{class_type}' (a ComfyUI core node nodegraph does not have yet)")
        else:
            lines.append(f"'{class_type}' (from a custom node pack nodegraph does not know)")
    return "; ".join(lines)
