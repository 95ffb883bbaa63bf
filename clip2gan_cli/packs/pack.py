"""`Pack`: the loaded models of one pack, and the metadata every written file gets from them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, first_line
from ..fileutil import sha256_file


@dataclass
class Pack:
    """Loaded models of one pack; the discriminator and identity net load on first use."""

    name: str
    generator: Any                     # stylegan2.networks.Generator (frozen, eval)
    clip: Any                          # clip.ClipModel (frozen, eval)
    mapper: Any | None                 # mapper.Mapper (frozen, eval) or None (need_mapper=False)
    info: Any | None = None            # weights.PackEntry (None for explicit --mapper/--generator/--clip)
    paths: dict[str, Path] = field(default_factory=dict)  # role -> local file
    device: Any = None                 # torch.device the models are on
    backend: str = "auto"
    precision: str = "auto"            # the StyleGAN2 networks' (resolved at load: fp32 | fp16 | bf16)
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def is_face_pack(self) -> bool:
        """Face packs (with an identity net) align inputs with MTCNN by default."""
        return bool(self.info is not None and getattr(self.info, "identity", None))

    def file_hashes(self) -> dict[str, str]:
        """Role -> first 16 hex digits of the sha256 of its file (for PNG metadata); cached."""
        for role, path in sorted(self.paths.items()):
            if role not in self._hashes:
                self._hashes[role] = sha256_file(path)[:16]
        return dict(sorted(self._hashes.items()))

    def load_discriminator(self):
        """The pack's StyleGAN2 discriminator (trainable=False; the trainer re-enables grads), or None; its
        num_fp16_res blocks run in the pack's precision."""
        path = self.paths.get("discriminator")
        if path is None:
            return None
        from ..stylegan2.convert import load_discriminator

        return load_discriminator(str(path), device=str(self.device or "auto"), backend=self.backend,
                                  precision=self.precision)

    def load_identity(self):
        """facenet-pytorch InceptionResnetV1 with the pack's vggface2 weights (frozen), or None."""
        reference = getattr(self.info, "identity", None) if self.info is not None else None
        if not reference:
            return None
        import torch
        from facenet_pytorch import InceptionResnetV1

        from ..device import place_model
        from ..weights import resolve_reference

        path = resolve_reference(reference)
        network = InceptionResnetV1(pretrained=None, classify=False)  # never let facenet download
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # classifier head unused
            network.load_state_dict(state, strict=True)
        except Exception as error:
            raise CheckpointError(f"cannot load identity weights {path.name}: {first_line(error, 160)}") \
                from error
        return place_model(network, self.device)


def output_metadata(pack: Pack, **extra) -> dict[str, str]:
    """Text metadata for written files: pack, model file hashes, clip2gan version, and `extra`."""
    import json

    from .. import __version__

    metadata = {"pack": pack.name, "model_hashes": json.dumps(pack.file_hashes(), sort_keys=True),
                "clip2gan_version": __version__, "software": f"clip2gan {__version__}"}
    metadata.update({key: str(value) for key, value in extra.items()})
    return metadata
