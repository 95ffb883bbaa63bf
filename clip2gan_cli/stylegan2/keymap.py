"""rosinality <-> NVIDIA StyleGAN2 key names (index rules of nvidia_rosinality_keymap_ffhq1024.json).

The rules hold at every resolution (see `rosinality_generator_key`); every tensor keeps its
numbers, only the reshapes of the key map are applied and the constant blur kernels dropped.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..errors import CheckpointError

_ROS_STYLE = re.compile(r"style\.(\d+)\.(weight|bias)")
_ROS_NOISE = re.compile(r"noises\.noise_(\d+)")
_ROS_LAYER = re.compile(r"(conv1|to_rgb1|convs\.(\d+)|to_rgbs\.(\d+))\.(.+)")
# Suffix inside a rosinality StyledConv / ToRGB -> (NVIDIA suffix or None to drop, reshape rule).
_ROS_MODULATED_CONV = {  # what a StyledConv and a ToRGB share: rosinality's ModulatedConv2d
    "conv.weight": ("weight", "drop_batch"),
    "conv.modulation.weight": ("affine.weight", "same"),
    "conv.modulation.bias": ("affine.bias", "same"),
}
_ROS_STYLED_CONV = {
    **_ROS_MODULATED_CONV,
    "noise.weight": ("noise_strength", "scalar"),
    "activate.bias": ("bias", "same"),
    "conv.blur.kernel": (None, "upsample_kernel"),
}
_ROS_TO_RGB = {
    **_ROS_MODULATED_CONV,
    "bias": ("bias", "rgb_bias"),
    "upsample.kernel": (None, "upsample_kernel"),
}
_ROS_D_BLOCK = {
    "conv1.0.weight": ("conv0.weight", "same"),
    "conv1.1.bias": ("conv0.bias", "same"),
    "conv2.1.weight": ("conv1.weight", "same"),
    "conv2.2.bias": ("conv1.bias", "same"),
    "skip.1.weight": ("skip.weight", "same"),
    "conv2.0.kernel": (None, "downsample_kernel"),
    "skip.0.kernel": (None, "downsample_kernel"),
}
_ROS_D_FIXED = {
    "convs.0.0.weight": "fromrgb.weight",  # prefixed with b{R}. below
    "convs.0.1.bias": "fromrgb.bias",
    "final_conv.0.weight": "b4.conv.weight",
    "final_conv.1.bias": "b4.conv.bias",
    "final_linear.0.weight": "b4.fc.weight",
    "final_linear.0.bias": "b4.fc.bias",
    "final_linear.1.weight": "b4.out.weight",
    "final_linear.1.bias": "b4.out.bias",
}


def _fir_kernel(gain: float) -> torch.Tensor:
    """rosinality's make_kernel([1,3,3,1]) times gain (4 for upsampling, 1 for downsampling)."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum() * gain


def _reshaped(name: str, tensor: torch.Tensor, rule: str) -> torch.Tensor | None:
    """Apply one reshape rule of the key map; None for dropped (verified constant) kernels."""
    shape = tuple(tensor.shape)
    if rule == "same":
        return tensor
    if rule in ("upsample_kernel", "downsample_kernel"):
        expected = _fir_kernel(4.0 if rule == "upsample_kernel" else 1.0)
        if shape != (4, 4) or (not tensor.is_meta and not torch.allclose(tensor.float(), expected, atol=1e-6)):
            raise CheckpointError(f"{name} is not the [1,3,3,1] blur kernel every StyleGAN2 uses; "
                                  "other kernels are not supported")
        return None
    if rule == "drop_batch" and len(shape) == 5 and shape[0] == 1:  # [1,O,I,k,k] -> [O,I,k,k]
        return tensor.reshape(shape[1:])
    if rule == "scalar" and tensor.numel() == 1 and len(shape) <= 1:  # [1] -> []
        return tensor.reshape(())
    if rule == "rgb_bias" and len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1):  # [1,C,1,1] -> [C]
        return tensor.reshape(shape[1])
    if rule == "const" and len(shape) == 4 and shape[0] == 1:  # [1,C,4,4] -> [C,4,4]
        return tensor.reshape(shape[1:])
    if rule == "noise" and len(shape) == 4 and shape[:2] == (1, 1):  # [1,1,r,r] -> [r,r]
        return tensor.reshape(shape[2:])
    raise CheckpointError(f"rosinality tensor {name} has an unexpected shape {list(shape)}")


def _synthesis_layer(index: int) -> str:
    """NVIDIA name of noise layer `index` in rosinality order (conv1, convs.0, convs.1, ...)."""
    if index == 0:
        return "synthesis.b4.conv1"
    k = (index - 1) // 2
    return f"synthesis.b{2 ** (k + 3)}.conv{(index - 1) % 2}"


def rosinality_generator_key(name: str) -> tuple[str | None, str]:
    """(NVIDIA key or None when dropped, reshape rule) for one rosinality Generator key.

    Rules: `style.{i+1}` -> `mapping.fc{i}`; `input.input` -> `synthesis.b4.const`; `conv1` ->
    `b4.conv1`; `to_rgb1` -> `b4.torgb`; for block resolution r >= 8 with k = log2(r) - 3:
    `convs.{2k}` -> `b{r}.conv0`, `convs.{2k+1}` -> `b{r}.conv1`, `to_rgbs.{k}` -> `b{r}.torgb`;
    `noises.noise_0` -> `b4.conv1.noise_const`, `noise_{2k+1}` -> `b{r}.conv0`, `noise_{2k+2}` ->
    `b{r}.conv1`. Blur / upsample kernels are constants and are dropped (after a check).
    """
    if name == "input.input":
        return "synthesis.b4.const", "const"
    if match := _ROS_STYLE.fullmatch(name):
        index = int(match.group(1))
        if index >= 1:  # style.0 is PixelNorm, which has no tensors
            return f"mapping.fc{index - 1}.{match.group(2)}", "same"
    if match := _ROS_NOISE.fullmatch(name):
        return f"{_synthesis_layer(int(match.group(1)))}.noise_const", "noise"
    if match := _ROS_LAYER.fullmatch(name):
        layer, conv_index, rgb_index, suffix = match.groups()
        if layer == "conv1":
            nvidia_layer, table = "synthesis.b4.conv1", _ROS_STYLED_CONV
        elif layer == "to_rgb1":
            nvidia_layer, table = "synthesis.b4.torgb", _ROS_TO_RGB
        elif conv_index is not None:
            n = int(conv_index)
            nvidia_layer, table = f"synthesis.b{2 ** (n // 2 + 3)}.conv{n % 2}", _ROS_STYLED_CONV
        else:
            nvidia_layer, table = f"synthesis.b{2 ** (int(rgb_index) + 3)}.torgb", _ROS_TO_RGB
        if suffix in table:
            target, rule = table[suffix]
            return (f"{nvidia_layer}.{target}" if target else None), rule
    raise CheckpointError(f"unexpected key '{name}' in a rosinality generator state dict")


def rosinality_to_nvidia_generator(state_dict: Mapping[str, torch.Tensor],
                                   latent_avg: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Translate a rosinality Generator state dict (+ optional `latent_avg`) to NVIDIA key names.

    Every tensor keeps its numbers; only the reshapes of the key map are applied. `latent_avg`
    becomes `mapping.w_avg`; without it the result has no `mapping.w_avg`.
    """
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        check_tensor(name, tensor)
        target, rule = rosinality_generator_key(name)
        value = _reshaped(name, tensor, rule)
        if target is None or value is None:
            continue
        if target in converted:
            raise CheckpointError(f"rosinality key '{name}' maps onto '{target}' twice")
        converted[target] = value
    if latent_avg is not None:
        check_tensor("latent_avg", latent_avg)
        if latent_avg.ndim == 2 and latent_avg.shape[0] == 1:  # some tools keep it as [1, w_dim]
            latent_avg = latent_avg[0]
        if latent_avg.ndim != 1:
            raise CheckpointError(f"latent_avg has shape {list(latent_avg.shape)}; expected [w_dim]")
        converted["mapping.w_avg"] = latent_avg
    return converted


def rosinality_discriminator_key(name: str, img_resolution: int) -> tuple[str | None, str]:
    """(NVIDIA key or None when dropped, reshape rule) for one rosinality Discriminator key.

    Rules: `convs.0` (1x1 from-RGB) -> `b{R}.fromrgb`; ResBlock `convs.{j}` (j >= 1) is NVIDIA
    block `b{R / 2^(j-1)}`: `conv1.0/1.1` -> `conv0`, `conv2.1/2.2` -> `conv1` (index 0 is the
    Blur), `skip.1` -> `skip`; `final_conv` -> `b4.conv`; `final_linear.0/1` -> `b4.fc/out`.
    """
    if name in _ROS_D_FIXED:
        target = _ROS_D_FIXED[name]
        return (f"b{img_resolution}.{target}" if name.startswith("convs.0.") else target), "same"
    match = re.fullmatch(r"convs\.(\d+)\.(.+)", name)
    if match and int(match.group(1)) >= 1 and match.group(2) in _ROS_D_BLOCK:
        block_resolution = img_resolution >> (int(match.group(1)) - 1)
        target, rule = _ROS_D_BLOCK[match.group(2)]
        return (f"b{block_resolution}.{target}" if target else None), rule
    raise CheckpointError(f"unexpected key '{name}' in a rosinality discriminator state dict")


def rosinality_to_nvidia_discriminator(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a rosinality Discriminator state dict to NVIDIA key names (the resolution is
    read from the number of `convs` entries: from-RGB plus log2(R) - 2 residual blocks)."""
    indices = sorted({int(m.group(1)) for key in state_dict if (m := re.match(r"convs\.(\d+)\.", key))})
    if not indices or indices != list(range(len(indices))) or len(indices) < 2:
        raise CheckpointError("rosinality discriminator: its convs.* entries are missing or not contiguous")
    img_resolution = 4 << (len(indices) - 1)
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        check_tensor(name, tensor)
        target, rule = rosinality_discriminator_key(name, img_resolution)
        value = _reshaped(name, tensor, rule)
        if target is not None and value is not None:
            converted[target] = value
    return converted


def check_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"checkpoint entry '{name}' is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_meta and not (tensor.is_floating_point() or name.endswith("kernel")):
        raise CheckpointError(f"checkpoint tensor '{name}' has dtype {tensor.dtype}; expected floating point")
