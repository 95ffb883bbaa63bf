"""Safe import of users' StyleGAN2 checkpoints, conversion to `.safetensors`, and the loading API.

Accepted sources (the format is sniffed from the bytes, never trusted from the suffix):

- NVIDIA network pickles (`.pkl`, stylegan2-ada-pytorch / stylegan3): read by the restricted
  unpickler of `safe_pickle.py`; the Python source they embed is never executed. G_ema is used
  (G when there is no G_ema), plus D when present.
- rosinality `.pt` files: `torch.load(weights_only=True)` with only `argparse.Namespace` added to
  torch's allow-list. Converted files hold `{g_ema, latent_avg}` (sometimes `g`, `d`); training
  snapshots hold `{g, d, g_ema, g_optim, d_optim, args, ada_aug_p}` and no `latent_avg`, which is
  then estimated as rosinality's `mean_latent` does (recorded in the file's metadata).
- The project's own `.safetensors` files: NVIDIA key names plus the config JSON in the metadata
  (or in a `.json` beside the file; failing both, the architecture is read from the shapes).

Key names are NVIDIA's throughout; rosinality names are translated by index rules that hold at
every resolution (see `rosinality_to_nvidia_generator`). The architecture is always read from
the tensors' names and shapes (`infer_generator_config`); only settings that change no shape
(conv_clamp, minibatch-std group size, mapping lr multiplier) come from the file's recorded
attributes or default to NVIDIA's values.

    G = load_generator("stylegan2-ffhq-1024x1024")        # registry name: fetch, convert once, load
    G = load_generator("network-snapshot-000800.pkl")     # converted into <cache>/converted/ once
    D = load_discriminator("550000.pt", device="cpu")
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, Clip2ganError, UnsafeCheckpointError, UserInputError
from ..fileutil import atomic_path, sha256_file
from .networks import Discriminator, DiscriminatorConfig, Generator, GeneratorConfig, load_state_dict_strict
from .safe_pickle import PersistentObject, flatten_state_dict, load_restricted_pickle, plain_data

GENERATOR_FORMAT = "clip2gan-stylegan2-generator"
DISCRIMINATOR_FORMAT = "clip2gan-stylegan2-discriminator"
CONVERTER_VERSION = "1"  # bump when conversion output changes, so cached files are redone

# rosinality's generate.py estimates the truncation centre as the mean of 4096 mapped z.
LATENT_AVG_SAMPLES = 4096
LATENT_AVG_SEED = 0
DEFAULT_MAPPING_LR_MUL = 0.01  # every published StyleGAN2 (NVIDIA and rosinality) uses 0.01
DEFAULT_MBSTD_GROUP_SIZE = 4  # rosinality's fixed group; NVIDIA's default

_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_PREFIX = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # protocol 2, LONG1 of the torch magic


# ----------------------------------------------------------------------------------------------
# Imported networks


@dataclass
class ImportedNetwork:
    """One network read from a checkpoint: NVIDIA-named tensors, its config, and provenance."""

    kind: str  # "generator" or "discriminator"
    state_dict: dict[str, torch.Tensor]
    config: GeneratorConfig | DiscriminatorConfig
    metadata: dict[str, str] = field(default_factory=dict)
    estimate_w_avg: bool = False  # the checkpoint had no truncation centre: estimate it after loading


@dataclass
class ImportedCheckpoint:
    """What a checkpoint file holds: a generator and, when present, a discriminator."""

    generator: ImportedNetwork | None
    discriminator: ImportedNetwork | None
    source_format: str  # "nvidia-pkl", "rosinality-pt", "torch-state-dict" or "safetensors"


# ----------------------------------------------------------------------------------------------
# rosinality <-> NVIDIA key names (index rules of nvidia_rosinality_keymap_ffhq1024.json)

_ROS_STYLE = re.compile(r"style\.(\d+)\.(weight|bias)")
_ROS_NOISE = re.compile(r"noises\.noise_(\d+)")
_ROS_LAYER = re.compile(r"(conv1|to_rgb1|convs\.(\d+)|to_rgbs\.(\d+))\.(.+)")
# Suffix inside a rosinality StyledConv / ToRGB -> (NVIDIA suffix or None to drop, reshape rule).
_ROS_STYLED_CONV = {
    "conv.weight": ("weight", "drop_batch"),
    "conv.modulation.weight": ("affine.weight", "same"),
    "conv.modulation.bias": ("affine.bias", "same"),
    "noise.weight": ("noise_strength", "scalar"),
    "activate.bias": ("bias", "same"),
    "conv.blur.kernel": (None, "upsample_kernel"),
}
_ROS_TO_RGB = {
    "conv.weight": ("weight", "drop_batch"),
    "conv.modulation.weight": ("affine.weight", "same"),
    "conv.modulation.bias": ("affine.bias", "same"),
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
        _check_tensor(name, tensor)
        target, rule = rosinality_generator_key(name)
        value = _reshaped(name, tensor, rule)
        if target is None or value is None:
            continue
        if target in converted:
            raise CheckpointError(f"rosinality key '{name}' maps onto '{target}' twice")
        converted[target] = value
    if latent_avg is not None:
        _check_tensor("latent_avg", latent_avg)
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
        _check_tensor(name, tensor)
        target, rule = rosinality_discriminator_key(name, img_resolution)
        value = _reshaped(name, tensor, rule)
        if target is not None and value is not None:
            converted[target] = value
    return converted


def _check_tensor(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"checkpoint entry '{name}' is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_meta and not (tensor.is_floating_point() or name.endswith("kernel")):
        raise CheckpointError(f"checkpoint tensor '{name}' has dtype {tensor.dtype}; expected floating point")


# ----------------------------------------------------------------------------------------------
# Architecture from tensor names and shapes


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
                           mapping_lr_mul: float = DEFAULT_MAPPING_LR_MUL,
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
                               w_avg_beta=float(w_avg_beta), conv_clamp=conv_clamp, use_noise=use_noise,
                               **_channel_fields(channels))
    except UserInputError as error:
        raise CheckpointError(f"{what}: {error}") from None


def infer_discriminator_config(state_dict: Mapping[str, torch.Tensor], *, conv_clamp: float | None = None,
                               mbstd_group_size: int | None = DEFAULT_MBSTD_GROUP_SIZE) -> DiscriminatorConfig:
    """The DiscriminatorConfig of an NVIDIA-named state dict, read from its tensor names and shapes.

    Resolution from `b{R}.fromrgb`, channels from the block weights, minibatch-std channels from
    `b4.conv.weight`. The minibatch-std group size changes no shape and is an argument.
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
                                   mbstd_group_size=mbstd_group_size, mbstd_num_channels=mbstd_num_channels,
                                   **_channel_fields(channels))
    except UserInputError as error:
        raise CheckpointError(f"{what}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files


def sniff_format(path: Path) -> str:
    """'nvidia-pkl', 'torch-zip', 'torch-legacy' or 'safetensors', from the file's first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise UserInputError(f"cannot read {path}: {error.strerror or error}") from None
    if head.startswith(_TORCH_ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(_LEGACY_TORCH_PREFIX):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 27):
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "nvidia-pkl"
    raise CheckpointError(f"{path.name} is not a StyleGAN2 checkpoint this tool reads "
                          "(expected an NVIDIA .pkl, a rosinality .pt or a .safetensors file)")


def read_checkpoint(path: str | os.PathLike) -> ImportedCheckpoint:
    """Read a checkpoint file into NVIDIA-named state dicts and configs, executing nothing from it."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint file {path} does not exist")
    kind = sniff_format(path)
    if kind == "nvidia-pkl":
        return _read_nvidia_pickle(path)
    if kind in ("torch-zip", "torch-legacy"):
        return _read_torch_checkpoint(path, kind)
    return _read_safetensors(path)


def _read_nvidia_pickle(path: Path) -> ImportedCheckpoint:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserInputError(f"cannot read {path}: {error.strerror or error}") from None
    root = load_restricted_pickle(data, what=path.name)
    del data
    if not isinstance(root, dict):
        raise CheckpointError(f"{path.name}: not an NVIDIA network pickle (its root is not a dict)")
    network_name = "G_ema" if isinstance(root.get("G_ema"), PersistentObject) else "G"
    generator_node = root.get(network_name)
    if not isinstance(generator_node, PersistentObject) or generator_node.class_name != "Generator":
        raise CheckpointError(f"{path.name}: the pickle holds no StyleGAN2 generator (keys: {_key_list(root)})")
    discriminator_node = root.get("D")
    if discriminator_node is not None and (not isinstance(discriminator_node, PersistentObject)
                                           or discriminator_node.class_name != "Discriminator"):
        raise CheckpointError(f"{path.name}: its 'D' entry is not a StyleGAN2 discriminator")
    generator = _nvidia_generator(generator_node, network_name, path.name)
    discriminator = _nvidia_discriminator(discriminator_node, path.name) if discriminator_node else None
    return ImportedCheckpoint(generator, discriminator, "nvidia-pkl")


def _recorded_number(node: PersistentObject | None, attribute: str, default: Any, what: str,
                     allow_none: bool = True, integer: bool = False) -> Any:
    """A shape-neutral setting recorded as a plain attribute of an NVIDIA module (else `default`), validated."""
    value = node.attribute(attribute) if node is not None and attribute in node.state else default
    if value is None and allow_none:
        return None
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid_type or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{what}: recorded {attribute}={value!r} is not a positive number")
    return value


def _init_kwarg(node: PersistentObject, *paths: str, default: Any = None) -> Any:
    """The first of `paths` ('synthesis_kwargs.conv_clamp', ...) found in the recorded constructor kwargs."""
    kwargs = node.attribute("_init_kwargs")
    for dotted in paths:
        value: Any = kwargs
        for part in dotted.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is not _MISSING:
            return value
    return default


_MISSING = object()


def _nvidia_generator(node: PersistentObject, network_name: str, source: str) -> ImportedNetwork:
    state_dict = flatten_state_dict(node)
    what = f"{source} {network_name}"
    architecture = (node.find("synthesis.b4") or node).attribute("architecture", "skip")
    if architecture != "skip":
        raise CheckpointError(f"{what}: generator architecture '{architecture}' is not supported (only 'skip')")
    # Shape-neutral settings: the modules' own attributes first, then the constructor kwargs
    # (nested in stylegan2-ada, flat in stylegan3's networks_stylegan2), then NVIDIA's defaults.
    recorded_clamp = _init_kwarg(node, "synthesis_kwargs.conv_clamp", "conv_clamp")
    recorded_lr_mul = _init_kwarg(node, "mapping_kwargs.lr_multiplier", default=DEFAULT_MAPPING_LR_MUL)
    config = infer_generator_config(
        state_dict,
        conv_clamp=_recorded_number(node.find("synthesis.b4.conv1"), "conv_clamp", recorded_clamp, what),
        mapping_lr_mul=_recorded_number(node.find("mapping.fc0"), "bias_gain", recorded_lr_mul, what,
                                        allow_none=False),
        w_avg_beta=_recorded_number(node.find("mapping"), "w_avg_beta", 0.995, what, allow_none=False))
    metadata = {"source_network": network_name, "w_avg_source": "checkpoint (mapping.w_avg)",
                "init_kwargs": json.dumps(plain_data(node.attribute("_init_kwargs", {}))),
                "source_format": "nvidia-pkl"}
    return ImportedNetwork("generator", state_dict, config, metadata)


def _nvidia_discriminator(node: PersistentObject, source: str) -> ImportedNetwork:
    state_dict = flatten_state_dict(node)
    what = f"{source} D"
    img_resolution = int(node.attribute("img_resolution", 0) or 0)
    top_block = node.child(f"b{img_resolution}") if img_resolution else None
    architecture = (top_block or node).attribute("architecture", "resnet")
    if architecture != "resnet":
        raise CheckpointError(f"{what}: discriminator architecture '{architecture}' is not supported (only 'resnet')")
    recorded_group = _init_kwarg(node, "epilogue_kwargs.mbstd_group_size", default=DEFAULT_MBSTD_GROUP_SIZE)
    group_size = _recorded_number(node.find("b4.mbstd"), "group_size", recorded_group, what, integer=True)
    conv_clamp = _recorded_number(node.find("b4.conv"), "conv_clamp", _init_kwarg(node, "conv_clamp"), what)
    config = infer_discriminator_config(state_dict, conv_clamp=conv_clamp, mbstd_group_size=group_size)
    metadata = {"source_network": "D", "init_kwargs": json.dumps(plain_data(node.attribute("_init_kwargs", {}))),
                "source_format": "nvidia-pkl"}
    return ImportedNetwork("discriminator", state_dict, config, metadata)


def _check_zip_sizes(path: Path) -> None:
    """Refuse torch zip archives whose entries claim more bytes than the archive holds."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > size or info.compress_size > size:
                    raise CheckpointError(f"{path.name}: archive entry {info.filename} claims {info.file_size} "
                                          f"bytes in a {size}-byte file (oversized length field)")
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path.name}: corrupt torch archive ({error})") from None


def _torch_load(path: Path, kind: str) -> Any:
    """torch.load(weights_only=True) with argparse.Namespace as the one addition to the allow-list."""
    if kind == "torch-zip":
        _check_zip_sizes(path)
        source: Any = path
    else:  # legacy streams are read from memory so no length field can size a read beyond the file
        source = io.BytesIO(path.read_bytes())
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        match = re.search(r"GLOBAL ([\w.]+)", message)
        if match or "Unsupported" in message:  # torch's weights-only unpickler refused something
            name = match.group(1) if match else "an object outside torch's weights-only allow-list"
            raise UnsafeCheckpointError(f"{path.name}: refused {name} while loading with weights_only=True; "
                                        "nothing was executed") from None
        detail = next((line.strip() for line in reversed(message.splitlines()) if "error" in line.lower()),
                      message.strip().splitlines()[0] if message.strip() else "unreadable pickle")
        raise CheckpointError(f"{path.name}: corrupt torch checkpoint ({detail[:200]})") from None
    except Clip2ganError:
        raise
    except Exception as error:  # torch raises RuntimeError / EOFError / ValueError for damaged files
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path.name}: cannot read the torch checkpoint "
                              f"({type(error).__name__}: {first_line})") from None


def _read_torch_checkpoint(path: Path, kind: str) -> ImportedCheckpoint:
    checkpoint = _torch_load(path, kind)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path.name}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):  # a bare state dict
        checkpoint = {"g_ema": checkpoint}
    network_name = next((name for name in ("g_ema", "g", "G_ema", "G") if isinstance(checkpoint.get(name), dict)),
                        None)
    if network_name is None:
        raise CheckpointError(f"{path.name}: no generator found (expected 'g_ema' or 'g'; keys: {_key_list(checkpoint)})")
    latent_avg = checkpoint.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"{path.name}: latent_avg is not a tensor")
    provenance = {"source_network": network_name}
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):  # a rosinality training snapshot: keep its settings as info
        provenance["training_args"] = json.dumps(plain_data(vars(args)))
    generator = _generator_from_tensors(checkpoint[network_name], latent_avg, path.name, provenance)
    discriminator_tensors = next((checkpoint[name] for name in ("d", "D") if isinstance(checkpoint.get(name), dict)),
                                 None)
    discriminator = (_discriminator_from_tensors(discriminator_tensors, path.name, {"source_network": "d"})
                     if discriminator_tensors is not None else None)
    layout = generator.metadata.get("source_format", "")
    return ImportedCheckpoint(generator, discriminator, layout)


def _generator_from_tensors(tensors: Mapping[str, Any], latent_avg: torch.Tensor | None, source: str,
                            provenance: dict[str, str], config: GeneratorConfig | None = None) -> ImportedNetwork:
    """An ImportedNetwork from a generator state dict in NVIDIA or rosinality layout."""
    tensors = dict(tensors)
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
    metadata = dict(provenance)
    if "synthesis.b4.const" in tensors:
        state_dict = tensors
        metadata.setdefault("source_format", "nvidia-state-dict")
        if latent_avg is not None and "mapping.w_avg" not in state_dict:
            state_dict["mapping.w_avg"] = latent_avg.reshape(-1)
    elif "input.input" in tensors:
        state_dict = rosinality_to_nvidia_generator(tensors, latent_avg)
        metadata.setdefault("source_format", "rosinality-pt")
    else:
        raise CheckpointError(f"{source}: unknown generator layout (expected NVIDIA keys such as synthesis.b4.const "
                              f"or rosinality keys such as input.input; found {_key_list(tensors)})")
    estimate = "mapping.w_avg" not in state_dict
    if not estimate:
        metadata.setdefault("w_avg_source", "latent_avg" if latent_avg is not None else "checkpoint (mapping.w_avg)")
    config = config if config is not None else infer_generator_config(state_dict)
    return ImportedNetwork("generator", state_dict, config, metadata, estimate_w_avg=estimate)


def _discriminator_from_tensors(tensors: Mapping[str, Any], source: str, provenance: dict[str, str],
                                config: DiscriminatorConfig | None = None) -> ImportedNetwork:
    tensors = dict(tensors)
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
    metadata = dict(provenance)
    if "b4.out.weight" in tensors:
        state_dict = tensors
        metadata.setdefault("source_format", "nvidia-state-dict")
    elif "final_linear.1.weight" in tensors:
        state_dict = rosinality_to_nvidia_discriminator(tensors)
        metadata.setdefault("source_format", "rosinality-pt")
    else:
        raise CheckpointError(f"{source}: unknown discriminator layout (expected NVIDIA keys such as b4.out.weight "
                              f"or rosinality keys such as final_linear.1.weight; found {_key_list(tensors)})")
    config = config if config is not None else infer_discriminator_config(state_dict)
    return ImportedNetwork("discriminator", state_dict, config, metadata)


def _key_list(mapping: Mapping, limit: int = 6) -> str:
    keys = [str(key) for key in mapping]
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "") or "none"


# --- the project's own .safetensors files (and prefixed parity files)

_PREFIXES = {"generator": ("G_ema.", "G.", "g_ema.", "g."), "discriminator": ("D.", "d.")}


def _read_safetensors(path: Path) -> ImportedCheckpoint:
    """A project .safetensors (one network, config in the metadata or a JSON beside it), or a file whose
    keys carry network prefixes (G_ema./G./D. or g_ema./g./d. with latent_avg) holding both."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path.name}: cannot read the safetensors file ({error})") from None
    file_format = metadata.get("format")
    if file_format in (GENERATOR_FORMAT, DISCRIMINATOR_FORMAT):
        kind = "generator" if file_format == GENERATOR_FORMAT else "discriminator"
        config = _config_from_json(metadata.get("config"), kind, f"{path.name} metadata")
        provenance = {k: v for k, v in metadata.items() if k not in ("format", "config")}
        provenance.setdefault("source_format", "safetensors")
        network = (_generator_from_tensors(tensors, None, path.name, provenance, config) if kind == "generator"
                   else _discriminator_from_tensors(tensors, path.name, provenance, config))
        return ImportedCheckpoint(network if kind == "generator" else None,
                                  network if kind == "discriminator" else None, "safetensors")
    beside = _config_beside(path)
    found: dict[str, ImportedNetwork | None] = {"generator": None, "discriminator": None}
    for kind, prefixes in _PREFIXES.items():
        prefix = next((p for p in prefixes if any(key.startswith(p) for key in tensors)), None)
        if prefix is None:
            continue
        part = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        config = beside.get(kind)
        if kind == "generator":
            found[kind] = _generator_from_tensors(part, tensors.get("latent_avg"), path.name,
                                                  {"source_network": prefix[:-1]}, config)
        else:
            found[kind] = _discriminator_from_tensors(part, path.name, {"source_network": prefix[:-1]}, config)
    if found["generator"] is None and found["discriminator"] is None:  # unprefixed: one bare network
        if "b4.out.weight" in tensors or "final_linear.1.weight" in tensors:
            found["discriminator"] = _discriminator_from_tensors(tensors, path.name, {}, beside.get("discriminator"))
        else:
            found["generator"] = _generator_from_tensors(tensors, tensors.pop("latent_avg", None), path.name, {},
                                                         beside.get("generator"))
    return ImportedCheckpoint(found["generator"], found["discriminator"], "safetensors")


def _config_from_json(text: Any, kind: str, where: str) -> GeneratorConfig | DiscriminatorConfig:
    config_class = GeneratorConfig if kind == "generator" else DiscriminatorConfig
    try:
        data = json.loads(text) if isinstance(text, str) else text
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return config_class.from_dict(data)
    except (ValueError, TypeError, UserInputError) as error:
        raise CheckpointError(f"{where}: invalid {kind} config ({error})") from None


def _config_beside(path: Path) -> dict[str, Any]:
    """Configs from `<name>.json` beside a safetensors file: a config object itself, or one under
    'generator' / 'discriminator' keys. A JSON of another schema is ignored (shapes decide)."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return {}
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{json_path.name}: unreadable config ({error})") from None
    if not isinstance(data, dict):
        return {}
    configs: dict[str, Any] = {}
    for kind in ("generator", "discriminator"):
        if isinstance(data.get(kind), dict):
            configs[kind] = _config_from_json(data[kind], kind, json_path.name)
    if not configs and "img_resolution" in data:
        kind = "generator" if "z_dim" in data else "discriminator"
        configs[kind] = _config_from_json(data, kind, json_path.name)
    return configs


# ----------------------------------------------------------------------------------------------
# Building networks and saving them


def _build(network: ImportedNetwork, backend: str, source: str) -> torch.nn.Module:
    """A network of the imported config with the imported weights (CPU, strict key/shape check)."""
    try:
        module = (Generator(network.config, backend=backend) if network.kind == "generator"
                  else Discriminator(network.config, backend=backend))
    except UserInputError as error:
        raise CheckpointError(f"{source}: {error}") from None
    state_dict = network.state_dict
    if network.estimate_w_avg:  # a placeholder centre, replaced by the estimate right after loading
        state_dict = {**state_dict, "mapping.w_avg": torch.zeros(network.config.w_dim)}
    load_state_dict_strict(module, state_dict, source=source)
    if network.estimate_w_avg:
        estimate_w_avg(module)
        network.metadata["w_avg_source"] = (f"estimated: mean of mapping(z) over {LATENT_AVG_SAMPLES} z ~ N(0, I) "
                                            f"drawn from torch.Generator seed {LATENT_AVG_SEED} (rosinality mean_latent)")
        network.estimate_w_avg = False
    return module


@torch.no_grad()
def estimate_w_avg(generator: Generator, samples: int = LATENT_AVG_SAMPLES, seed: int = LATENT_AVG_SEED) -> torch.Tensor:
    """Set `mapping.w_avg` to the mean of the mapping over `samples` seeded z (rosinality's
    `mean_latent`, used when a checkpoint has no truncation centre); returns it."""
    z = torch.randn([samples, generator.z_dim], generator=torch.Generator().manual_seed(seed))
    z = z.to(generator.w_avg.device, generator.w_avg.dtype)
    w = generator.mapping(z, truncation_psi=1.0)[:, 0]
    generator.mapping.w_avg.copy_(w.mean(dim=0))
    return generator.mapping.w_avg


def _save_module(module: torch.nn.Module, path: str | os.PathLike, file_format: str,
                 extra_metadata: Mapping[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in module.state_dict().items()}
    metadata = {str(key): value if isinstance(value, str) else json.dumps(value)
                for key, value in (extra_metadata or {}).items()}
    metadata.update({"format": file_format, "config": json.dumps(module.config.to_dict()),
                     "converter_version": CONVERTER_VERSION})
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def save_generator(G: Generator, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a generator's state dict to `path` (.safetensors) with its config JSON in the metadata.

    The write is atomic. `extra_metadata` values are stored as strings (non-strings as JSON).
    """
    return _save_module(G, path, GENERATOR_FORMAT, extra_metadata)


def save_discriminator(D: Discriminator, path: str | os.PathLike,
                       extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a discriminator's state dict to `path` (.safetensors) with its config JSON in the metadata."""
    return _save_module(D, path, DISCRIMINATOR_FORMAT, extra_metadata)


# ----------------------------------------------------------------------------------------------
# Conversion cache


def converted_paths(source: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(<out_dir>/<stem>.G.safetensors, <out_dir>/<stem>.D.safetensors) for a checkpoint path;
    `out_dir` defaults to `<cache>/converted`."""
    if out_dir is None:
        from ..weights import cache_dir

        out_dir = cache_dir() / "converted"
    stem = Path(source).stem
    return Path(out_dir) / f"{stem}.G.safetensors", Path(out_dir) / f"{stem}.D.safetensors"


def discriminator_path(generator_path: str | os.PathLike) -> Path:
    """The `.D.safetensors` file that belongs to a converted `.G.safetensors` file."""
    generator_path = Path(generator_path)
    return generator_path.with_name(generator_path.name.replace(".G.safetensors", ".D.safetensors"))




def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # an unreadable cached file is simply redone
        return {}


def _cached_conversion(source: Path, generator_path: Path) -> bool:
    """True when `generator_path` (and its D when recorded) was converted from this very source."""
    if not generator_path.is_file():
        return False
    metadata = _read_metadata(generator_path)
    if metadata.get("format") != GENERATOR_FORMAT or metadata.get("converter_version") != CONVERTER_VERSION:
        return False
    if metadata.get("has_discriminator") == "true" and not discriminator_path(generator_path).is_file():
        return False
    stat = source.stat()
    if metadata.get("source_size") == str(stat.st_size) and metadata.get("source_mtime_ns") == str(stat.st_mtime_ns):
        return True
    return metadata.get("source_sha256") == sha256_file(source)


def convert_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert an NVIDIA .pkl or rosinality .pt into the project's .safetensors files; return G's path.

    Writes `<out_dir>/<stem>.G.safetensors` and, when the checkpoint has a discriminator,
    `<stem>.D.safetensors` (config JSON in the metadata; `out_dir` defaults to
    `<cache>/converted`). Conversion happens once: a file converted from the same source (same
    size and mtime, or same sha256) is reused. A refused or malformed checkpoint raises
    UnsafeCheckpointError / CheckpointError and writes nothing.
    """
    source = Path(path)
    if not source.is_file():
        raise UserInputError(f"checkpoint file {source} does not exist")
    generator_path, discriminator_out = converted_paths(source, out_dir)
    if _cached_conversion(source, generator_path):
        return generator_path
    checkpoint = read_checkpoint(source)
    if checkpoint.generator is None:
        raise CheckpointError(f"{source.name} holds no generator")
    stat = source.stat()
    provenance = {"source": source.name, "source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns),
                  "source_sha256": sha256_file(source)}
    generator = _build(checkpoint.generator, "reference", source.name)
    discriminator = (_build(checkpoint.discriminator, "reference", source.name)
                     if checkpoint.discriminator is not None else None)
    if discriminator is not None:  # written first, so a G file never points at a missing D
        save_discriminator(discriminator, discriminator_out, {**checkpoint.discriminator.metadata, **provenance})
    save_generator(generator, generator_path, {**checkpoint.generator.metadata, **provenance,
                                               "has_discriminator": "true" if discriminator is not None else "false"})
    return generator_path


# ----------------------------------------------------------------------------------------------
# Public loading API


def _resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint path for `source`: an existing file, or a registry name fetched into the cache."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise UserInputError(f"{path} is not a checkpoint file (it is a directory or a special file)")
    text = str(source)
    looks_like_path = (isinstance(source, os.PathLike) or os.sep in text or "/" in text
                       or path.suffix.lower() in (".pkl", ".pt", ".pth", ".safetensors", ".ckpt"))
    if looks_like_path:
        raise UserInputError(f"checkpoint file {path} does not exist")
    from ..weights import fetch

    return fetch(text)


def _load_network(source: str | os.PathLike, kind: str, device: str, backend: str) -> torch.nn.Module:
    from ..device import place_model, resolve_device

    target_device = resolve_device(device)  # fail fast on a bad device before any heavy work
    path = _resolve_source(source)
    if sniff_format(path) != "safetensors":  # NVIDIA / rosinality files are converted once, then read back
        generator_path = convert_checkpoint(path)
        path = generator_path if kind == "generator" else discriminator_path(generator_path)
        if not path.is_file():
            raise CheckpointError(f"{Path(source).name} holds no discriminator")
    checkpoint = _read_safetensors(path)
    network = checkpoint.generator if kind == "generator" else checkpoint.discriminator
    if network is None:
        other = "a discriminator" if kind == "generator" else "a generator"
        raise CheckpointError(f"{path.name} holds {other}, not a {kind}")
    module = _build(network, backend, path.name)
    return place_model(module, target_device)


def load_generator(source: str | os.PathLike, device: str = "auto", backend: str = "auto") -> Generator:
    """A frozen, eval-mode StyleGAN2 Generator from a registry name, an NVIDIA `.pkl`, a rosinality
    `.pt`, or a project `.safetensors` (config JSON inside or beside it).

    The architecture is read from the checkpoint's tensors; nothing inside the file is executed.
    Raises UserInputError for a missing file, UnsafeCheckpointError for a file that asks to run
    code, CheckpointError for an unreadable or unsupported one.
    """
    return _load_network(source, "generator", device, backend)


def load_discriminator(source: str | os.PathLike, device: str = "auto", backend: str = "auto") -> Discriminator:
    """A frozen, eval-mode StyleGAN2 Discriminator from the same kinds of source as `load_generator`."""
    return _load_network(source, "discriminator", device, backend)


__all__ = [
    "CONVERTER_VERSION", "DISCRIMINATOR_FORMAT", "GENERATOR_FORMAT", "ImportedCheckpoint", "ImportedNetwork",
    "convert_checkpoint", "converted_paths", "discriminator_path", "estimate_w_avg", "infer_discriminator_config",
    "infer_generator_config", "load_discriminator", "load_generator", "read_checkpoint",
    "rosinality_discriminator_key", "rosinality_generator_key", "rosinality_to_nvidia_discriminator",
    "rosinality_to_nvidia_generator", "save_discriminator", "save_generator", "sniff_format",
]
