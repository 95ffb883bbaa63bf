"""The architecture of a StyleGAN2 network, read from its NVIDIA-named tensors' names and shapes.

Only settings that change no shape (conv_clamp, num_fp16_res, minibatch-std group size, mapping lr
multiplier) are arguments; the file's recorded attributes supply them, else NVIDIA's defaults below.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, UserInputError
from .networks import DiscriminatorConfig, GeneratorConfig

DEFAULT_MAPPING_LR_MUL = 0.01  # every published StyleGAN2 (NVIDIA and rosinality) uses 0.01
DEFAULT_MBSTD_GROUP_SIZE = 4  # rosinality's fixed group; NVIDIA's default


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    tensor = state_dict.get(key)
    if tensor is None:
        raise CheckpointError(f"{what}: tensor '{key}' is missing (not a config-f StyleGAN2 layout)")
    return tuple(tensor.shape)


def _resolution_chain(found: set[int], what: str) -> int:
    """The top resolution of blocks found, checking they are exactly 4 (or 8), ..., R by doubling."""
    if not found:
        raise CheckpointError(f"{what}: no resolution blocks found")
    top = max(found)
    if top < 4 or top & (top - 1):
        raise CheckpointError(f"{what}: block resolution {top} is not a power of two")
    return top


def _channel_formula(channels: dict[int, int]) -> tuple[int, int] | None:
    """(channel_base, channel_max) reproducing the table as min(base // res, max), when one exists."""
    channel_max = max(channels.values())
    below = {res * ch for res, ch in channels.items() if ch < channel_max}
    if len(below) > 1:
        return None
    candidates = list(below) or [32768, 16384, channel_max * max(channels)]
    for channel_base in candidates:
        if all(min(channel_base // res, channel_max) == ch for res, ch in channels.items()):
            return channel_base, channel_max
    return None


def _channel_fields(channels: dict[int, int]) -> dict[str, Any]:
    """Config fields for a channel table: the NVIDIA formula when it fits, else an explicit table."""
    formula = _channel_formula(channels)
    if formula is not None:
        return {"channel_base": formula[0], "channel_max": formula[1], "channels": None}
    return {"channels": dict(channels)}


def infer_generator_config(state_dict: Mapping[str, torch.Tensor], *, conv_clamp: float | None = None,
                           num_fp16_res: int = 0, mapping_lr_mul: float = DEFAULT_MAPPING_LR_MUL,
                           w_avg_beta: float = 0.995) -> GeneratorConfig:
    """The GeneratorConfig of an NVIDIA-named state dict, read from its tensor names and shapes.

    Resolution from the `synthesis.b{r}` blocks, channels per resolution from the weight shapes,
    z/w dims and mapping depth from `mapping.fc{i}`. Settings that change no shape are arguments.
    Raises CheckpointError when the layout is not a config-f (`skip`) StyleGAN2 generator.
    """
    what = "generator checkpoint"
    if any(key.startswith("mapping.embed.") for key in state_dict):
        raise CheckpointError(f"{what}: class-conditional generators (c_dim > 0) are not supported")
    fc_indices = sorted({int(m.group(1)) for key in state_dict if (m := re.fullmatch(r"mapping\.fc(\d+)\.weight", key))})
    if not fc_indices or fc_indices != list(range(len(fc_indices))):
        raise CheckpointError(f"{what}: mapping.fc0 ... mapping.fc<N> weights are missing or not contiguous")
    z_dim = _shape(state_dict, "mapping.fc0.weight", what)[1]
    w_dim = _shape(state_dict, f"mapping.fc{fc_indices[-1]}.weight", what)[0]
    for index in fc_indices:
        expected = (w_dim, z_dim if index == 0 else w_dim)
        if _shape(state_dict, f"mapping.fc{index}.weight", what) != expected:
            raise CheckpointError(f"{what}: mapping.fc{index}.weight has shape "
                                  f"{list(_shape(state_dict, f'mapping.fc{index}.weight', what))}, expected "
                                  f"{list(expected)} (mapping layers narrower than w_dim are not supported)")
    found = {int(m.group(1)) for key in state_dict if (m := re.match(r"synthesis\.b(\d+)\.", key))}
    img_resolution = _resolution_chain(found, what)
    resolutions = [2 ** i for i in range(2, int(math.log2(img_resolution)) + 1)]
    if found != set(resolutions):
        raise CheckpointError(f"{what}: synthesis blocks {sorted(found)} are not 4, 8, ..., {img_resolution}")
    channels = {4: _shape(state_dict, "synthesis.b4.const", what)[0]}
    for res in resolutions:
        channels[res] = _shape(state_dict, f"synthesis.b{res}.conv1.weight", what)[0]
        if f"synthesis.b{res}.torgb.weight" not in state_dict:
            raise CheckpointError(f"{what}: block b{res} has no torgb: only the config-f 'skip' generator "
                                  "is supported")
        if any(key.startswith(f"synthesis.b{res}.skip.") for key in state_dict):
            raise CheckpointError(f"{what}: 'resnet' generators are not supported (only 'skip')")
    img_channels = _shape(state_dict, f"synthesis.b{img_resolution}.torgb.weight", what)[0]
    use_noise = "synthesis.b4.conv1.noise_strength" in state_dict
    try:
        return GeneratorConfig(img_resolution=img_resolution, z_dim=z_dim, w_dim=w_dim, img_channels=img_channels,
                               mapping_layers=len(fc_indices), mapping_lr_mul=float(mapping_lr_mul),
                               w_avg_beta=float(w_avg_beta), conv_clamp=conv_clamp, num_fp16_res=num_fp16_res,
                               use_noise=use_noise,
                               **_channel_fields(channels))
    except UserInputError as error:
        raise CheckpointError(f"{what}: {error}") from None


def infer_discriminator_config(state_dict: Mapping[str, torch.Tensor], *, conv_clamp: float | None = None,
                               num_fp16_res: int = 0,
                               mbstd_group_size: int | None = DEFAULT_MBSTD_GROUP_SIZE) -> DiscriminatorConfig:
    """The DiscriminatorConfig of an NVIDIA-named state dict, read from its tensor names and shapes.

    Resolution from `b{R}.fromrgb`, channels from the block weights, minibatch-std channels from
    `b4.conv.weight`. The minibatch-std group size, conv_clamp and num_fp16_res change no shape and are
    arguments.
    """
    what = "discriminator checkpoint"
    if any(key.startswith("mapping.") for key in state_dict):
        raise CheckpointError(f"{what}: class-conditional discriminators (c_dim > 0) are not supported")
    fromrgb = [int(m.group(1)) for key in state_dict if (m := re.fullmatch(r"b(\d+)\.fromrgb\.weight", key))]
    if len(fromrgb) != 1:
        raise CheckpointError(f"{what}: expected one b<R>.fromrgb.weight, found {len(fromrgb)} "
                              "(only the config-f 'resnet' discriminator is supported)")
    img_resolution = _resolution_chain(set(fromrgb), what)
    blocks = [2 ** i for i in range(int(math.log2(img_resolution)), 2, -1)]
    found = {int(m.group(1)) for key in state_dict if (m := re.match(r"b(\d+)\.", key))}
    if found != set(blocks) | {4}:
        raise CheckpointError(f"{what}: blocks {sorted(found)} are not 4, 8, ..., {img_resolution}")
    channels = {res: _shape(state_dict, f"b{res}.conv0.weight", what)[0] for res in blocks}
    channels[4] = _shape(state_dict, "b4.conv.weight", what)[0]
    for res in blocks:
        if f"b{res}.skip.weight" not in state_dict:
            raise CheckpointError(f"{what}: block b{res} has no skip: only the 'resnet' discriminator is supported")
        if _shape(state_dict, f"b{res}.conv1.weight", what)[0] != channels[res // 2]:
            raise CheckpointError(f"{what}: b{res}.conv1.weight does not lead into b{res // 2}'s channels")
    mbstd_num_channels = _shape(state_dict, "b4.conv.weight", what)[1] - channels[4]
    if _shape(state_dict, "b4.out.weight", what)[0] != 1:
        raise CheckpointError(f"{what}: b4.out gives more than one logit (projection discriminators are not supported)")
    img_channels = _shape(state_dict, f"b{img_resolution}.fromrgb.weight", what)[1]
    try:
        return DiscriminatorConfig(img_resolution=img_resolution, img_channels=img_channels, conv_clamp=conv_clamp,
                                   num_fp16_res=num_fp16_res, mbstd_group_size=mbstd_group_size,
                                   mbstd_num_channels=mbstd_num_channels,
                                   **_channel_fields(channels))
    except UserInputError as error:
        raise CheckpointError(f"{what}: {error}") from None
