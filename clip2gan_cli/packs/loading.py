"""Loading packs: a name (or explicit --mapper/--generator/--clip flags) -> a `Pack` of models on a device.

`load_pack("ffhq-1024")` resolves a registry pack (files fetched into the cache), `load_pack()` the
builtin `shapes` pack shipped in this directory, and `load_models(mapper=..., generator=..., clip=...)`
the explicit `--mapper/--generator/--clip` flags. Every model goes through `device.place_model`.

Builtin pack layout (`clip2gan_cli/packs/<name>/`): generator.safetensors, clip.safetensors +
clip_config.json (open_clip model config + tokenizer + preprocessing), mapper.safetensors,
optionally discriminator.safetensors.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import NoMapperError, UserInputError, WeightsNotFoundError
from .clip_spec import load_clip_spec
from .pack import Pack

DEFAULT_PACK = "shapes"
PACKS_DIR = Path(__file__).resolve().parent
BUILTIN_FILES = {  # role -> file name inside a builtin pack directory
    "generator": "generator.safetensors",
    "clip_weights": "clip.safetensors",
    "clip_config": "clip_config.json",
    "mapper": "mapper.safetensors",
    "discriminator": "discriminator.safetensors",
}


def train_command(name: str) -> str:
    """The command that trains and registers a mapper for pack `name`."""
    return f"clip2gan train --pack {name} --data DIR_OR_synthetic --out runs/{name} --export-pack {name}"


def load_pack(name: str | None = None, device="auto", backend: str = "auto", need_mapper: bool = True,
              text_only: bool = False, precision: str = "auto") -> Pack:
    """Load pack `name` (default: the builtin `shapes`) onto `device`.

    need_mapper=True raises NoMapperError (with the train command) for a pack without a trained
    mapper; training passes False. An unknown name raises UserInputError listing the known packs.
    text_only=True: the caller only encodes text (generate); a custom CLIP may then load just its
    text tower (clip.load_clip). `precision` is the generator's (and the discriminator's, when
    loaded): auto | fp32 | fp16 | bf16, as stylegan2.load_generator; CLIP and mapper stay float32.
    """
    from ..device import resolve_device
    from ..stylegan2.convert import network_precision
    from ..weights import load_registry, resolve_reference

    name = name or DEFAULT_PACK
    registry = load_registry()
    if name not in registry.packs:
        raise UserInputError(f"unknown pack '{name}'", hint=f"known packs: {', '.join(sorted(registry.packs))}")
    entry = registry.pack(name)
    torch_device = resolve_device(device) if not hasattr(device, "type") else device
    network_precision(precision, torch_device)  # a bad name fails before any file is fetched
    if entry.builtin:
        paths = _builtin_paths(name)
    else:
        if need_mapper and not entry.mapper:
            raise _no_mapper(name)
        paths = {role: resolve_reference(ref, registry=registry) for role, ref in entry.file_references().items()}
    if need_mapper and "mapper" not in paths:
        raise _no_mapper(name)

    from ..clip import load_clip, load_clip_from_config_file

    if "clip_config" in paths:
        clip = load_clip_from_config_file(paths["clip_config"], paths.get("clip_weights"), device=torch_device,
                                          text_only=text_only)
    elif entry.clip_model and entry.clip_model.endswith(".json"):
        # A local pack with a custom CLIP: clip_model is the path of its clip_config.json.
        paths["clip_config"] = Path(entry.clip_model).expanduser()
        clip = load_clip_from_config_file(paths["clip_config"], paths.get("clip_weights"), device=torch_device,
                                          text_only=text_only)
    else:
        clip = load_clip(entry.clip_model, entry.clip_pretrained, weights_path=paths.get("clip_weights"),
                         device=torch_device)
    pack = _assemble(name, entry, paths, clip, torch_device, backend, need_mapper, precision)
    # Registry files have pinned hashes: no need to re-read hundreds of MB for PNG metadata.
    for role, ref in ({} if entry.builtin else entry.file_references()).items():
        pinned = registry.files[ref].sha256 if ref in registry.files else None
        if pinned and role in pack.paths:
            pack._hashes[role] = pinned[:16]
    return pack


def _no_mapper(name: str) -> NoMapperError:
    return NoMapperError(f"pack '{name}' has no trained mapper yet (none has been published for it)",
                         hint=f"train one with: {train_command(name)}")


def _builtin_paths(name: str) -> dict[str, Path]:
    """Files of a builtin pack present in its package directory (generator and CLIP are required)."""
    directory = PACKS_DIR / name
    paths = {role: directory / file for role, file in BUILTIN_FILES.items() if (directory / file).is_file()}
    missing = [BUILTIN_FILES[role] for role in ("generator", "clip_weights", "clip_config") if role not in paths]
    if missing:
        raise WeightsNotFoundError(f"builtin pack '{name}' is missing {', '.join(missing)} in {directory}",
                                   hint="reinstall clip2gan, or rebuild the pack with python -m clip2gan_cli.recipes.shapes.build")
    return paths


def _assemble(name: str, entry, paths: dict[str, Path], clip, device, backend: str, need_mapper: bool,
              precision: str) -> Pack:
    """Load generator and mapper, check that they fit the CLIP, and wrap everything in a Pack."""
    from ..device import place_model
    from ..mapper import check_compatible, load_mapper
    from ..stylegan2.convert import load_generator

    generator = load_generator(str(paths["generator"]), device=str(device), backend=backend,
                               precision=precision)  # frozen, eval
    mapper = None
    if "mapper" in paths:
        mapper = place_model(load_mapper(paths["mapper"]), device)
        check_compatible(mapper, generator, clip)
    elif need_mapper:
        raise _no_mapper(name)
    return Pack(name=name, generator=generator, clip=clip, mapper=mapper, info=entry, paths=dict(paths),
                device=device, backend=backend, precision=generator.precision)


def load_models(mapper: str | Path | None = None, generator: str | None = None, clip: str | None = None,
                device="auto", backend: str = "auto", need_mapper: bool = True, text_only: bool = False,
                precision: str = "auto") -> Pack:
    """Models from explicit flags: --mapper FILE, --generator SRC (registry name or file), --clip MODEL:TAG.

    All three are needed (the generator and CLIP of a run directory are not recorded next to its mapper).
    `precision` as in `load_pack`.
    """
    from ..device import resolve_device
    from ..stylegan2.convert import network_precision
    from ..weights import resolve_reference

    missing = [f"`{name}`" for name, value in (("generator", generator), ("clip", clip)) if not value]
    if need_mapper and not mapper:
        missing.insert(0, "`mapper`")
    if missing:
        raise UserInputError(f"{', '.join(missing)} missing", hint="give `mapper`, `generator` and `clip` together, "
                                                                   "or use `pack` NAME")
    torch_device = resolve_device(device) if not hasattr(device, "type") else device
    network_precision(precision, torch_device)  # a bad name fails before any file is read
    paths: dict[str, Path] = {}
    if mapper:
        mapper_path = Path(mapper).expanduser()
        if not mapper_path.is_file():
            raise UserInputError(f"mapper file not found: {mapper_path}")
        paths["mapper"] = mapper_path
    generator_path = Path(generator).expanduser()
    paths["generator"] = generator_path if generator_path.is_file() else resolve_reference(generator)
    clip_model, clip_paths = load_clip_spec(clip, torch_device, text_only)
    paths.update(clip_paths)
    return _assemble("custom", None, paths, clip_model, torch_device, backend, need_mapper, precision)


def select_models(pack: str | None = None, mapper: str | Path | None = None, generator: str | None = None,
                  clip: str | None = None, device="auto", backend: str = "auto", need_mapper: bool = True,
                  text_only: bool = False, precision: str = "auto") -> Pack:
    """--pack NAME, or --mapper/--generator/--clip (not both); neither: the default pack. `precision` as in
    `load_pack`."""
    if any((mapper, generator, clip)):
        if pack:
            raise UserInputError("give either `pack` or `mapper`/`generator`/`clip`, not both")
        return load_models(mapper=mapper, generator=generator, clip=clip, device=device, backend=backend,
                           need_mapper=need_mapper, text_only=text_only, precision=precision)
    return load_pack(pack, device=device, backend=backend, need_mapper=need_mapper, text_only=text_only,
                     precision=precision)
