"""CLIP's text tower without importing open_clip, for commands that only encode text (generate).

Importing open_clip imports torchvision, whose `ops.roi_align` imports `torch._dynamo`: 3 to 5 s
on a 2-core CPU before any work, several times what `generate` computes on the builtin pack. This
module rebuilds open_clip's default text transformer (pre-norm blocks with nn.MultiheadAttention, a
causal mask, argmax pooling, a projection matrix) under the same state-dict keys, so a text-only
load reads the text tensors straight from the pack's safetensors file. `supports(model_cfg)` admits
only configs whose every text option has open_clip's default (anything else loads through
open_clip); tests assert the features equal open_clip's.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

# open_clip CLIPTextCfg options this module implements, with the value it implements.
_DEFAULT_TEXT_OPTIONS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
    "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "output_tokens": False,
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "hf_model_name": None, "hf_tokenizer_name": None,
}
_SIZE_OPTIONS = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                 "tokenizer_kwargs", "tokenizer_mode", "pad_id", "eos_id")  # pad/eos only matter to other pool types
TEXT_KEY_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def supports(model_cfg: dict[str, Any]) -> bool:
    """True when open_clip would build exactly this module's text tower for `model_cfg`."""
    text_cfg = model_cfg.get("text_cfg", {})
    if model_cfg.get("custom_text") or model_cfg.get("cast_dtype") not in (None, "fp32"):
        return False
    for key, value in text_cfg.items():
        if key in _SIZE_OPTIONS:
            continue
        if key not in _DEFAULT_TEXT_OPTIONS or value != _DEFAULT_TEXT_OPTIONS[key]:
            return False
    return True


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (open_clip's keys)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)),
                                              ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """open_clip CLIP's text encoder: token ids [N, context] -> projected features [N, embed_dim]."""

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__()
        text_cfg = model_cfg["text_cfg"]
        context, width = int(text_cfg.get("context_length", 77)), int(text_cfg.get("width", 512))
        self.token_embedding = nn.Embedding(int(text_cfg.get("vocab_size", 49408)), width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, int(text_cfg.get("heads", 8)), float(text_cfg.get("mlp_ratio", 4.0)),
                                   bool(model_cfg.get("quick_gelu", False)))
            for _ in range(int(text_cfg.get("layers", 12))))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, int(model_cfg["embed_dim"])))
        # -inf above the diagonal: a token attends to itself and the tokens before it (as open_clip)
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu_(1), persistent=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features, as open_clip's CLIP.encode_text."""
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask.to(x.dtype))
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # the end-of-text token
        return pooled @ self.text_projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this CLIP was loaded text-only (load it without text_only to encode images)")


def load_text_tower(model_cfg: dict[str, Any], weights_path: str | Path) -> TextTower:
    """A TextTower with the text tensors of an open_clip safetensors checkpoint (strict on those keys)."""
    from safetensors import safe_open

    tower = TextTower(model_cfg)
    with safe_open(str(weights_path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(TEXT_KEY_PREFIXES)}
    tower.load_state_dict(state, strict=True)
    return tower

