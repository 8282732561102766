"""The SDXL parts of kohya's `sdxl_train_network.py`: both text encoders and the size conditioning.

Text (`strategy_sdxl.SdxlTextEncodingStrategy`):
1. The caption is tokenised twice with the same BPE: CLIP-L's ids padded with the end token, bigG's
   padded with 0 (kohya sets `tokenizer2.pad_token_id = 0`); 75-token chunks as for SD1.x.
2. CLIP-L's hidden state of layer 11 of 12 (the penultimate, *without* the final LayerNorm) and
   bigG's `hidden_states[-2]` (likewise), joined chunk-wise and concatenated on the channel axis:
   `[B, 75n+2, 768 + 1280]`.
3. The pooled vector is bigG's final-normed last layer at the first end token, through its
   `text_projection` (kohya's `pool_workaround`), from the first chunk: `[B, 1280]`.
kohya's `--clip_skip` does not apply to SDXL (it warns "clip_skip will be unexpected").

Size conditioning (`train_util.BaseDataset.__getitem__`, `BucketManager.get_crop_ltrb`): per image
the original size (H, W) of the file, the crop top-left that Stability's preprocessing would record
for the bucket, and the target size (H, W) = the bucket. The UNet embeds the six numbers with the
same 256-channel sinusoids as kohya's `get_size_embeddings` (diffusers' `add_time_proj`: cos first).
"""

from __future__ import annotations

from typing import Any

import torch

from nodes.sd.tokenizer import CLIP_G_PAD, ClipTokenizer, PaddedTokenizer
from nodes.train.captions import chunked_ids, join_chunks

Size = tuple[int, int]
SDXL_FAMILIES = ("sdxl",)  # kohya trains the base; the refiner (bigG alone, aesthetic score) is not supported


def size_condition(image_size: Size, bucket: Size, flipped: bool = False, bucketed: bool = True) -> list[int]:
    """kohya's `(original_size_hw, crop_top_left, target_size_hw)` for one image, flattened to six ints.

    `image_size` and `bucket` are (W, H). kohya computes the crop as the offset of the image fitted
    *inside* the bucket (`get_crop_ltrb`: "according to the preprocessing of Stability AI"), in floats
    floored with `//` and truncated with `int()`; a flipped image takes `W - crop_right` as its left.
    Without buckets kohya records crop (0, 0, 0, 0) and the image's own size (which it requires to
    be the training size); a flipped image then gets left = W, kohya's arithmetic kept as is.
    """
    target_w, target_h = bucket
    if bucketed:
        orig_w, orig_h = image_size
        left, top, right = _crop_ltr(bucket, image_size)
    else:
        orig_w, orig_h = bucket
        left, top, right = 0.0, 0.0, 0.0
    if flipped:
        left = target_w - right
    return [int(orig_h), int(orig_w), int(top), int(left), int(target_h), int(target_w)]


def _crop_ltr(bucket: Size, image_size: Size) -> tuple[float, float, float]:
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:  # the bucket is wider: the heights match
        resized_w, resized_h = bucket[1] * image_ar, float(bucket[1])
    else:
        resized_w, resized_h = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2
    top = (bucket[1] - resized_h) // 2
    return left, top, left + resized_w


def g_tokenizer(tokenizer: ClipTokenizer) -> ClipTokenizer:
    return PaddedTokenizer(tokenizer, CLIP_G_PAD)


def encode_sdxl(
    te_l: Any, te_g: Any, tokenizer: ClipTokenizer, captions: list[str], max_token_length: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(hidden `[B, 75n+2, 2048]`, pooled `[B, 1280]`) of the captions, as kohya's SDXL encoding."""
    n = (max_token_length or 75) // 75
    tok_g = g_tokenizer(tokenizer)
    ids_l = _ids(captions, tokenizer, max_token_length, device)
    ids_g = _ids(captions, tok_g, max_token_length, device)
    hidden_l = te_l(input_ids=ids_l, output_hidden_states=True).hidden_states[-2]
    out_g = te_g(input_ids=ids_g, output_hidden_states=True)
    hidden_g = out_g.hidden_states[-2]
    # kohya's pool_workaround: the first end token of each row (argmax of the mask), not the max id
    index = torch.argmax((ids_g == tokenizer.eos).int(), dim=1)
    last = out_g.last_hidden_state[torch.arange(ids_g.shape[0], device=device), index]
    pooled = te_g.text_projection(last)[::n]
    hidden = torch.cat([join_chunks(hidden_l.float(), n), join_chunks(hidden_g.float(), n)], dim=-1)
    return hidden, pooled.float()


def _ids(captions: list[str], tokenizer: ClipTokenizer, length: int | None, device: Any) -> torch.Tensor:
    return torch.tensor([c for t in captions for c in chunked_ids(t, tokenizer, length)], device=device)
