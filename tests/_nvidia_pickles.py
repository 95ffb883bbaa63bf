"""Build pickles in NVIDIA's `persistent_class` structure without NVIDIA's code (test helper).

Follows ../shared/parity/NVIDIA_PICKLE_FORMAT.md section 7: stand-in modules named
`torch_utils.persistence` (with `_reconstruct_persistent_obj`) and `dnnlib.util` (with `EasyDict`)
are registered in `sys.modules` only while pickling, so plain `pickle.dumps` writes the same
globals, meta dicts, nested storage blobs and numpy gains as a real snapshot. The module
source stored in the file is a placeholder (or a hostile one, for the safety tests).
"""
from __future__ import annotations

import collections
import contextlib
import pickle
import sys
import types
from typing import Any, Iterator

import numpy as np
import torch

PLACEHOLDER_SOURCE = "# stand-in for NVIDIA's training/networks.py: never executed by clip2gan\n"
BUFFER_NAMES = ("resample_filter", "noise_const", "w_avg")
# A module whose import creates the hostile tests' marker file (see the `marker` fixture in conftest.py).
MARKER_MODULE = "clip2gan_hostile_marker_module"

_persistence = types.ModuleType("torch_utils.persistence")
_dnnlib_util = types.ModuleType("dnnlib.util")


def _reconstruct_persistent_obj(meta):  # only its module/name matter: it is pickled by reference
    raise AssertionError("the stand-in reconstructor must never be called by the loader under test")


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (pickled as NEWOBJ + SETITEMS)."""


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
EasyDict.__module__ = "dnnlib.util"
_persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
_dnnlib_util.EasyDict = EasyDict


@contextlib.contextmanager
def _stand_in_modules() -> Iterator[None]:
    names = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": _persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": _dnnlib_util}
    previous = {name: sys.modules.get(name) for name in names}
    sys.modules.update(names)
    try:
        yield
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class PersistentNode:
    """A pickled stand-in for one NVIDIA persistent module: REDUCE(_reconstruct_persistent_obj, (meta,))."""

    # torch <= 1.9 (NVIDIA's own files) kept _parameters/_buffers/_modules in OrderedDicts.
    ordered_containers = False

    def __init__(self, class_name: str, module_src: str = PLACEHOLDER_SOURCE):
        self.class_name = class_name
        self.module_src = module_src
        self.parameters: dict[str, Any] = {}
        self.buffers: dict[str, Any] = {}
        self.modules: dict[str, PersistentNode | None] = {}
        self.attributes: dict[str, Any] = {}

    def __reduce__(self):
        hooks = {name: collections.OrderedDict() for name in (
            "_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks",
            "_state_dict_hooks", "_load_state_dict_pre_hooks")}
        container = collections.OrderedDict if self.ordered_containers else dict
        state = {"training": False, "_parameters": container(self.parameters), "_buffers": container(self.buffers),
                 "_non_persistent_buffers_set": set(), **hooks, "_modules": container(self.modules),
                 **self.attributes}
        meta = {"type": "class", "version": 6, "module_src": self.module_src, "class_name": self.class_name,
                "state": state}
        return _reconstruct_persistent_obj, (meta,)


def _generator_class(path: list[str]) -> str:
    if not path:
        return "Generator"
    if path[0] == "mapping":
        return "MappingNetwork" if len(path) == 1 else "FullyConnectedLayer"
    return {1: "SynthesisNetwork", 2: "SynthesisBlock"}.get(len(path)) or (
        "FullyConnectedLayer" if path[-1] == "affine" else "ToRGBLayer" if path[-1] == "torgb" else "SynthesisLayer")


def _discriminator_class(path: list[str]) -> str:
    if not path:
        return "Discriminator"
    if len(path) == 1:
        return "DiscriminatorEpilogue" if path[0] == "b4" else "DiscriminatorBlock"
    if path[0] == "b4":
        return {"mbstd": "MinibatchStdLayer", "conv": "Conv2dLayer"}.get(path[1], "FullyConnectedLayer")
    return "Conv2dLayer"


def build_tree(state_dict: dict[str, torch.Tensor], kind: str, attributes: dict[str, dict] | None = None,
               module_src: str = PLACEHOLDER_SOURCE) -> PersistentNode:
    """Nest NVIDIA-named tensors into PersistentNodes; `attributes` maps a dotted module path
    ('' for the root) to plain attributes to record on it (gains, conv_clamp, ...)."""
    class_of = _generator_class if kind == "generator" else _discriminator_class
    root = PersistentNode(class_of([]), module_src)
    nodes = {"": root}

    def node_at(path: list[str]) -> PersistentNode:
        key = ".".join(path)
        if key not in nodes:
            parent = node_at(path[:-1])
            nodes[key] = PersistentNode(class_of(path), module_src)
            parent.modules[path[-1]] = nodes[key]
        return nodes[key]

    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        owner = node_at(path)
        if leaf in BUFFER_NAMES:
            owner.buffers[leaf] = tensor.clone()
        else:
            owner.parameters[leaf] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
    if kind == "discriminator":
        node_at(["b4", "mbstd"])  # MinibatchStdLayer has no tensors, only attributes
    for path, values in (attributes or {}).items():
        node_at(path.split(".") if path else []).attributes.update(values)
    return root


def default_attributes(state_dict: dict[str, torch.Tensor], kind: str, conv_clamp: float | None = None,
                       mbstd_group_size: int | None = 4, num_fp16_res: int = 0) -> dict[str, dict]:
    """The plain attributes NVIDIA's modules carry (numpy float64 gains, conv_clamp, architecture, kwargs)."""
    attributes: dict[str, dict] = {}
    modules = {name.rsplit(".", 1)[0] for name in state_dict if "." in name}
    for module in sorted(modules):
        weight = state_dict.get(f"{module}.weight")
        if weight is None:
            continue
        fan_in = int(np.prod(weight.shape[1:]))
        lr_mul = 0.01 if module.startswith("mapping.fc") else 1.0
        attributes[module] = {"weight_gain": np.float64(lr_mul / np.sqrt(fan_in)), "bias_gain": lr_mul,
                              "conv_clamp": conv_clamp, "act_gain": np.float64(np.sqrt(2))}
    if kind == "generator":
        resolution = max(int(name.split(".")[1][1:]) for name in state_dict if name.startswith("synthesis.b"))
        attributes["mapping"] = {"w_avg_beta": 0.995, "num_ws": 2 * int(np.log2(resolution)) - 2}
        for res in (2 ** i for i in range(2, int(np.log2(resolution)) + 1)):
            attributes[f"synthesis.b{res}"] = {"architecture": "skip", "resolution": res}
        attributes[""] = {"img_resolution": resolution, "_init_kwargs": {
            "z_dim": state_dict["mapping.fc0.weight"].shape[1], "w_dim": state_dict["mapping.fc0.weight"].shape[0],
            "mapping_kwargs": EasyDict(num_layers=sum(1 for k in state_dict if k.endswith(".weight")
                                                      and k.startswith("mapping.fc"))),
            "synthesis_kwargs": EasyDict(channel_base=1024, channel_max=64, num_fp16_res=num_fp16_res,
                                         conv_clamp=conv_clamp),
            "c_dim": 0, "img_resolution": resolution, "img_channels": 3}, "_init_args": ()}
    else:
        resolution = max(int(name.split(".")[0][1:]) for name in state_dict)
        for res in (2 ** i for i in range(3, int(np.log2(resolution)) + 1)):
            attributes[f"b{res}"] = {"architecture": "resnet", "resolution": res}
            attributes[f"b{res}.skip"] = {**attributes.get(f"b{res}.skip", {}), "bias": None}
        attributes["b4.mbstd"] = {"group_size": mbstd_group_size, "num_channels": 1}
        attributes[""] = {"img_resolution": resolution,
                          "_init_kwargs": {"epilogue_kwargs": EasyDict(mbstd_group_size=mbstd_group_size),
                                           "architecture": "resnet", "conv_clamp": conv_clamp,
                                           "num_fp16_res": num_fp16_res}}
    return attributes


def dumps_snapshot(generator: dict[str, torch.Tensor], discriminator: dict[str, torch.Tensor] | None = None,
                   protocol: int = 4, conv_clamp: tuple[float | None, float | None] = (None, None),
                   mbstd_group_size: int | None = 4, module_src: str = PLACEHOLDER_SOURCE,
                   extra: dict[str, Any] | None = None, ordered_containers: bool = False,
                   num_fp16_res: tuple[int, int] = (0, 0)) -> bytes:
    """Pickle bytes of a training snapshot {training_set_kwargs, G, D, G_ema, augment_pipe} (+ extra entries).

    `ordered_containers` writes module containers as OrderedDicts, as torch <= 1.9 did; `conv_clamp` and
    `num_fp16_res` are (G's, D's) constructor kwargs."""
    g_attributes = default_attributes(generator, "generator", conv_clamp[0], num_fp16_res=num_fp16_res[0])
    root: dict[str, Any] = {"training_set_kwargs": {"class_name": "training.dataset.ImageFolderDataset",
                                                    "resolution": 32, "xflip": False}}
    # G holds the raw training weights: a perturbed copy, so a loader taking G instead of G_ema shows.
    root["G"] = build_tree({k: v + 1.0 if k.endswith("bias") else v for k, v in generator.items()}, "generator",
                           g_attributes, module_src)
    if discriminator is not None:
        root["D"] = build_tree(discriminator, "discriminator",
                               default_attributes(discriminator, "discriminator", conv_clamp[1], mbstd_group_size,
                                                  num_fp16_res[1]),
                               module_src)
    root["G_ema"] = build_tree(generator, "generator", g_attributes, module_src)
    root["augment_pipe"] = None
    root.update(extra or {})
    PersistentNode.ordered_containers = ordered_containers
    try:
        with _stand_in_modules():
            return pickle.dumps(root, protocol=protocol)
    finally:
        PersistentNode.ordered_containers = False


def dumps_with_stand_ins(obj: Any, protocol: int = 4) -> bytes:
    """pickle.dumps with the stand-in NVIDIA modules registered (for hand-made trees)."""
    with _stand_in_modules():
        return pickle.dumps(obj, protocol=protocol)


def touch_code(marker) -> str:
    """Python source that creates `marker`: what every hostile payload would run."""
    return f"open({str(marker)!r}, 'w').close()"
