"""Reading StyleGAN2 checkpoint files into NVIDIA-named state dicts and configs, executing nothing.

Accepted sources (the format is sniffed from the bytes, never trusted from the suffix):

- NVIDIA network pickles (`.pkl`, stylegan2-ada-pytorch / stylegan3): read by the restricted
  unpickler of `safe_pickle.py`; the Python source they embed is never executed. G_ema is used
  (G when there is no G_ema), plus D when present.
- rosinality `.pt` files: `torch.load(weights_only=True)` with only `argparse.Namespace` added to
  torch's allow-list. Converted files hold `{g_ema, latent_avg}` (sometimes `g`, `d`); training
  snapshots hold `{g, d, g_ema, g_optim, d_optim, args, ada_aug_p}` and no `latent_avg`, which is
  then estimated after loading (`ImportedNetwork.estimate_w_avg`).
- The project's own `.safetensors` files: NVIDIA key names plus the config JSON in the metadata
  (or in a `.json` beside the file; failing both, the architecture is read from the shapes).
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
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError, Clip2ganError, UnsafeCheckpointError, UserInputError
from .architecture import (DEFAULT_MAPPING_LR_MUL, DEFAULT_MBSTD_GROUP_SIZE, infer_discriminator_config,
                           infer_generator_config)
from .keymap import check_tensor, rosinality_to_nvidia_discriminator, rosinality_to_nvidia_generator
from .networks import DiscriminatorConfig, GeneratorConfig
from .safe_pickle import PersistentObject, flatten_state_dict, load_restricted_pickle, plain_data

GENERATOR_FORMAT = "clip2gan-stylegan2-generator"
DISCRIMINATOR_FORMAT = "clip2gan-stylegan2-discriminator"

_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_PREFIX = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # protocol 2, LONG1 of the torch magic


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
    return read_safetensors(path)


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


def _recorded_fp16_res(node: PersistentObject, what: str, *paths: str) -> int:
    """NVIDIA's num_fp16_res from the recorded constructor kwargs (0, all float32, when absent), validated."""
    value = _init_kwarg(node, *paths, default=0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{what}: recorded num_fp16_res={value!r} is not an integer >= 0")
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
        num_fp16_res=_recorded_fp16_res(node, what, "synthesis_kwargs.num_fp16_res", "num_fp16_res"),
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
    config = infer_discriminator_config(state_dict, conv_clamp=conv_clamp, mbstd_group_size=group_size,
                                        num_fp16_res=_recorded_fp16_res(node, what, "num_fp16_res"))
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
    def from_nvidia(state_dict):
        if latent_avg is not None and "mapping.w_avg" not in state_dict:
            state_dict["mapping.w_avg"] = latent_avg.reshape(-1)
        return state_dict

    state_dict, metadata = _in_nvidia_layout(
        "generator", tensors, source, provenance, ("synthesis.b4.const", "input.input"),
        (from_nvidia, lambda rosinality: rosinality_to_nvidia_generator(rosinality, latent_avg)))
    estimate = "mapping.w_avg" not in state_dict
    if not estimate:
        metadata.setdefault("w_avg_source", "latent_avg" if latent_avg is not None else "checkpoint (mapping.w_avg)")
    config = config if config is not None else infer_generator_config(state_dict)
    return ImportedNetwork("generator", state_dict, config, metadata, estimate_w_avg=estimate)


def _discriminator_from_tensors(tensors: Mapping[str, Any], source: str, provenance: dict[str, str],
                                config: DiscriminatorConfig | None = None) -> ImportedNetwork:
    """An ImportedNetwork from a discriminator state dict in NVIDIA or rosinality layout."""
    state_dict, metadata = _in_nvidia_layout(
        "discriminator", tensors, source, provenance, ("b4.out.weight", "final_linear.1.weight"),
        (lambda nvidia: nvidia, rosinality_to_nvidia_discriminator))
    config = config if config is not None else infer_discriminator_config(state_dict)
    return ImportedNetwork("discriminator", state_dict, config, metadata)


def _in_nvidia_layout(kind: str, tensors: Mapping[str, Any], source: str, provenance: dict[str, str],
                      keys: tuple[str, str], convert: tuple[Callable, Callable]) -> tuple[dict, dict[str, str]]:
    """Checked tensors in NVIDIA's layout and the metadata naming the layout they came in.

    `keys` are a key only NVIDIA's / only rosinality's layout has; `convert` maps each layout's dict to NVIDIA's.
    """
    tensors = dict(tensors)
    for name, tensor in tensors.items():
        check_tensor(name, tensor)
    metadata = dict(provenance)
    for key, to_nvidia, layout in zip(keys, convert, ("nvidia-state-dict", "rosinality-pt")):
        if key in tensors:
            metadata.setdefault("source_format", layout)
            return to_nvidia(tensors), metadata
    raise CheckpointError(f"{source}: unknown {kind} layout (expected NVIDIA keys such as {keys[0]} "
                          f"or rosinality keys such as {keys[1]}; found {_key_list(tensors)})")


def _key_list(mapping: Mapping, limit: int = 6) -> str:
    keys = [str(key) for key in mapping]
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "") or "none"


# --- the project's own .safetensors files (and prefixed parity files)

_PREFIXES = {"generator": ("G_ema.", "G.", "g_ema.", "g."), "discriminator": ("D.", "d.")}


def read_safetensors(path: Path) -> ImportedCheckpoint:
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
