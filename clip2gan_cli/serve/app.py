"""What the page does, as calls into clip2gan_cli.pipeline / imageio / packs: one method per request.

Every output is written by the CLI's own writer (imageio.write_*_outputs) into a fresh folder under the
server's temp folder, with the metadata the CLI gives it, so a download is byte for byte the file the
CLI command shown beside it writes. Files are reached through random tokens: no name or path sent by the
page is ever used to open a file. Model calls hold one lock: requests share the models, never their
seeds or outputs.
"""
from __future__ import annotations

import math
import secrets
import shlex
import shutil
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Clip2ganError, UserInputError, first_line

MAX_PROMPTS = 16            # prompts per generate request
MAX_IMAGES = 64             # images per generate request (prompts x n)
MAX_FRAMES = 120            # frames per interpolation
MAX_EDITS = 8               # edit texts per edit request
BETA_LIMIT = 10.0           # |beta| the page accepts (the slider spans it; the CLI accepts any finite beta)
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
KEEP_RESULTS = 256          # result folders kept in the temp folder (oldest removed first)
KEEP_IMAGES = 16            # source images kept (uploads, "send to Edit"): 12 MB each at 1024 px


def make_workdir() -> Path:
    """The server's temp folder: under $TMPDIR when set, else in memory (/dev/shm) where it has 1 GiB free.

    Results are throwaway (removed at exit), and the CLI writers fsync every file: on a disk that is
    ~12 ms per PNG (100 ms for generate's 8), in memory ~3 ms (bench/serve.py).
    """
    import os
    import tempfile

    shm = Path("/dev/shm")
    memory = (not os.environ.get("TMPDIR") and shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)
              and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize >= 2**30)  # containers: often 64 MB
    return Path(tempfile.mkdtemp(prefix="clip2gan-serve-", dir=str(shm) if memory else None))


@dataclass
class SourceImage:
    """An image the Edit tab works on: its tensor at the generator's resolution and its cached inversion."""

    name: str                 # the file name the user knows it by (upload name or generated file name)
    tensor: Any               # [1, 3, R, R] in [-1, 1]
    url: str                  # where the page shows it
    w_plus: Any = None        # pipeline.edit's inversion, reused while only betas change


@dataclass
class ModelSpec:
    """How the models were chosen on the serve command line (for the reproducing CLI commands)."""

    pack: str | None = None
    mapper: str | None = None
    generator: str | None = None
    clip: str | None = None
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"

    def cli_args(self) -> list[str]:
        args: list[str] = []
        if self.mapper or self.generator or self.clip:
            for flag, value in (("--mapper", self.mapper), ("--generator", self.generator), ("--clip", self.clip)):
                if value:
                    args += [flag, str(value)]
        elif self.pack:
            args += ["--pack", self.pack]
        if self.device != "auto":
            args += ["--device", self.device]
        if self.backend != "auto":
            args += ["--backend", self.backend]
        if self.precision != "auto":
            args += ["--precision", self.precision]
        return args


@dataclass
class ServeApp:
    """The models of one `clip2gan serve` and the results it has written into `workdir`."""

    models: Any               # packs.Pack
    spec: ModelSpec
    workdir: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _files: "OrderedDict[str, Path]" = field(default_factory=OrderedDict, repr=False)
    _results: "OrderedDict[str, Path]" = field(default_factory=OrderedDict, repr=False)
    _images: "OrderedDict[str, SourceImage]" = field(default_factory=OrderedDict, repr=False)

    # --- files ---
    def _new_folder(self) -> Path:
        token = secrets.token_hex(8)
        folder = self.workdir / token
        folder.mkdir(parents=True)
        self._results[token] = folder
        while len(self._results) > KEEP_RESULTS:
            _, old = self._results.popitem(last=False)
            for key in [k for k, path in self._files.items() if old in path.parents]:
                del self._files[key]
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def _publish(self, path: str | Path) -> str:
        """A URL for a file this app wrote: a random token, never its path."""
        token = secrets.token_hex(12)
        self._files[token] = Path(path)
        return f"/files/{token}/{Path(path).name}"

    def file(self, token: str) -> Path | None:
        """The file behind a token from `_publish`, or None."""
        return self._files.get(token)

    def _token_of(self, url: str) -> Path:
        parts = str(url).split("/")
        path = self._files.get(parts[2]) if len(parts) >= 3 and parts[1] == "files" else None
        if path is None:
            raise UserInputError("that image is gone from the server (generate it again)")
        return path

    # --- model info ---
    def model_info(self) -> dict[str, Any]:
        """Pack, file hashes, device, backend, precision, and the mapper's defaults (the page's initial values)."""
        from .. import __version__, imageio
        from ..mapper import EDIT_DIRECTIONS, GENERATION_PRIORS

        config = self.models.mapper.config
        generator = self.models.generator
        defaults = self.edit_defaults()
        layers = defaults["layers"]
        return {
            "pack": self.models.name, "version": __version__, "hashes": self.models.file_hashes(),
            "device": str(self.models.device), "backend": self.models.backend, "precision": self.models.precision,
            "resolution": int(generator.img_resolution), "num_ws": int(generator.num_ws),
            "face_pack": self.models.is_face_pack, "mp4": imageio.mp4_encoder(),
            "priors": list(GENERATION_PRIORS), "prior": config.generation_prior,
            "directions": list(EDIT_DIRECTIONS), "beta_limit": BETA_LIMIT,
            "edit_defaults": {**defaults, "layers": imageio.layers_label(layers)},
            "contrast_sets": config.edit_contrast_sets or [],
            "command": shlex.join(["clip2gan", "serve", *self.spec.cli_args()]),
        }

    def edit_defaults(self) -> dict[str, Any]:
        """The mapper's edit defaults, decided where `clip2gan edit` gets them (pipeline.edit_settings)."""
        from .. import pipeline

        settings = pipeline.edit_settings(self.models.mapper, [("edit", None)])
        return {"beta": settings.edits[0][1], "direction": settings.direction, "layers": settings.layers,
                "neutral": settings.neutral or pipeline.NEUTRAL_NONE}

    # --- generate ---
    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """`clip2gan generate PROMPT... -n N --seed S --truncation T --prior P`: the images and their URLs."""
        from .. import imageio, pipeline
        from ..mapper import GENERATION_PRIORS
        from ..packs import output_metadata

        texts = [line.strip() for line in str(request.get("prompts", "")).splitlines() if line.strip()]
        if not texts:
            raise UserInputError("empty prompt", hint="write one prompt per line")
        texts = pipeline.validate_prompts(texts)
        n = _integer(request.get("n", 8), "n", 1, MAX_IMAGES)
        seed = _integer(request.get("seed", 0), "seed", 0, 2**31 - 1)
        truncation = _number(request.get("truncation", 1.0), "truncation", -2.0, 2.0)
        prior = request.get("prior") or None
        if prior is not None and prior not in GENERATION_PRIORS:
            raise UserInputError(f"unknown prior '{prior}'", hint=f"expected {' or '.join(GENERATION_PRIORS)}")
        if len(texts) > MAX_PROMPTS or len(texts) * n > MAX_IMAGES:
            raise UserInputError(f"at most {MAX_PROMPTS} prompts and {MAX_IMAGES} images per request, "
                                 f"got {len(texts)} x {n}")
        with self._lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pipeline.generate(self.models.generator, self.models.clip, self.models.mapper, texts, n=n,
                                       seed=seed, truncation_psi=truncation, prior=prior)
            folder = self._new_folder()
            records = imageio.write_generate_outputs(
                folder, result.images, result.w_plus, texts, result.prompt_index, result.sample_index, seed,
                fmt="png", grid=False, save_latents=False,
                metadata=output_metadata(self.models, truncation=truncation, prior=result.prior))
            images = [{"url": self._publish(r["path"]), "name": Path(r["path"]).name, "prompt": r["prompt"],
                       "index": r["index"]} for r in records]
        command = ["clip2gan", "generate", *texts, "-n", str(n), "--seed", str(seed)]
        if truncation != 1.0:
            command += ["--truncation", f"{truncation:g}"]
        if prior is not None:
            command += ["--prior", prior]
        return {"images": images, "warnings": _warning_lines(caught),
                "command": shlex.join(command + self.spec.cli_args())}

    # --- source images for Edit / Interpolate ---
    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Take an uploaded image (bytes): checked by the CLI's reader, kept under a random id."""
        import re

        # a label only (metadata, the command shown): never part of a path
        name = re.sub(r"[\x00-\x1f\x7f]", "", Path(str(name or "")).name)[:128]
        name = name if name not in ("", ".", "..") else "upload"
        if len(data) > MAX_UPLOAD_BYTES:
            raise UserInputError(f"{name} is {len(data) / 2**20:.0f} MiB; uploads are limited to "
                                 f"{MAX_UPLOAD_BYTES // 2**20} MiB")
        with self._lock:
            folder = self._new_folder()
        path = folder / "upload"  # the reader goes by content, not by name
        path.write_bytes(data)
        return self._add_source(path, name)

    def use_generated(self, url: str) -> dict[str, Any]:
        """An image this server generated (a /files/ URL) as the Edit tab's source."""
        path = self._token_of(url)
        return self._add_source(path, path.name)

    def _add_source(self, path: Path, name: str) -> dict[str, Any]:
        from .. import imageio

        try:
            with self._lock:
                tensor = imageio.load_image_tensor(path, self.models.generator.img_resolution,
                                                   align=self.models.is_face_pack)
        except Clip2ganError as error:  # the message names the upload, not the server's temp file
            message = error.one_line().replace(str(path), name)
            # the page always aligns a face pack's uploads: it offers no `align=False`
            message = message.replace("use `align=False`", "upload a photo with one clearly visible face")
            raise UserInputError(message) from None
        image_id = secrets.token_hex(8)
        with self._lock:
            source = SourceImage(name=name, tensor=tensor, url=self._publish(path))
            self._images[image_id] = source
            while len(self._images) > KEEP_IMAGES:
                self._images.popitem(last=False)
        return {"image": image_id, "name": name, "url": source.url}

    def _source(self, image_id: Any) -> SourceImage:
        source = self._images.get(str(image_id))
        if source is None:
            raise UserInputError("no image to edit", hint="upload one, or send one from Generate")
        return source

    # --- edit ---
    def edit(self, request: dict[str, Any]) -> dict[str, Any]:
        """`clip2gan edit IMAGE TEXT --beta B [--edit T:B] --neutral N --direction D --layers L`."""
        from .. import imageio, pipeline
        from ..mapper import EDIT_DIRECTIONS, NEUTRAL_AUTO
        from ..packs import output_metadata

        source = self._source(request.get("image"))
        edits = request.get("edits") or []
        if not isinstance(edits, list) or not edits:
            raise UserInputError("no edit given", hint="write an edit text")
        if len(edits) > MAX_EDITS:
            raise UserInputError(f"at most {MAX_EDITS} edit texts, got {len(edits)}")
        requested = []
        for item in edits:
            text = str((item or {}).get("text", "")).strip() if isinstance(item, dict) else ""
            if not text:
                raise UserInputError("empty edit text", hint="write what the image should become")
            requested.append((text, _number(item.get("beta"), f"beta of '{text}'", -BETA_LIMIT, BETA_LIMIT)))
        direction = str(request.get("direction") or "")
        if direction not in EDIT_DIRECTIONS:
            raise UserInputError(f"unknown direction '{direction}'", hint=f"expected {' or '.join(EDIT_DIRECTIONS)}")
        neutral_mode = str(request.get("neutral") or "none")
        if neutral_mode == "text":
            neutral = str(request.get("neutral_text") or "").strip()
            if not neutral:
                raise UserInputError("empty neutral text", hint="write one, or choose auto or none")
        elif neutral_mode in (NEUTRAL_AUTO, "none"):
            neutral = neutral_mode  # "none" is pipeline.NEUTRAL_NONE
        else:
            raise UserInputError(f"unknown neutral '{neutral_mode}'", hint="expected auto, none or text")
        layers_text = str(request.get("layers") or "").strip()
        # "all" is `--layers :` (every row), so the file metadata matches the command shown
        layers = pipeline.parse_layers(":" if layers_text in ("", "all") else layers_text)
        pipeline.layer_mask(self.models.generator.num_ws, layers)
        models = self.models
        with self._lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pipeline.edit(models.generator, models.clip, models.mapper, source.tensor, requested,
                                   neutral=neutral, w_plus=source.w_plus, direction=direction, layers=layers)
            if source.w_plus is None:
                source.w_plus = result.w_plus
            used = [row[0] for row in result.neutrals]
            label, neutral_used = imageio.edit_label(requested, used)
            rows = imageio.layers_label(layers)
            records = imageio.write_edit_outputs(
                self._new_folder(), Path(source.name).stem, source.tensor, result.reconstruction, result.edited,
                result.w_plus_edited, label,
                metadata=output_metadata(models, source=source.name, edits=label, neutral=neutral_used,
                                         direction=direction, layers=rows))
            urls = {r["role"]: self._publish(r["path"]) for r in records}
        (first_text, first_beta), more = requested[0], requested[1:]
        command = ["clip2gan", "edit", source.name, first_text, "--beta", f"{first_beta:g}"]
        for text, beta in more:
            command += ["--edit", f"{text}:{beta:g}"]
        command += ["--neutral", neutral_mode if neutral_mode != "text" else neutral, "--direction", direction,
                    "--layers", rows]
        return {"edited": urls["edited"], "reconstruction": urls["reconstruction"], "sheet": urls["sheet"],
                "latent": urls["latent"],
                "neutrals": pipeline.describe_inferred_neutrals(requested, used) if neutral == NEUTRAL_AUTO else [],
                "warnings": _warning_lines(caught), "command": shlex.join(command + self.spec.cli_args())}

    # --- interpolate ---
    def interpolate(self, request: dict[str, Any]) -> dict[str, Any]:
        """`clip2gan interpolate A B --frames F [--spherical] --gif --mp4`: prompts or Edit's images as ends."""
        from .. import imageio, pipeline
        from ..mapper import GENERATION_PRIORS
        from ..packs import output_metadata

        frames = _integer(request.get("frames", 12), "frames", 2, MAX_FRAMES)
        fps = _number(request.get("fps", 12), "fps", 1, 60)
        seed = _integer(request.get("seed", 0), "seed", 0, 2**31 - 1)
        spherical = bool(request.get("spherical", False))
        prior = request.get("prior") or None
        if prior is not None and prior not in GENERATION_PRIORS:
            raise UserInputError(f"unknown prior '{prior}'", hint=f"expected {' or '.join(GENERATION_PRIORS)}")
        want_mp4 = bool(request.get("mp4", False)) and imageio.mp4_encoder() is not None
        ends = []
        for key in ("a", "b"):
            end = request.get(key) or {}
            if isinstance(end, dict) and end.get("image"):
                ends.append(("image", self._source(end["image"])))
            else:
                text = str(end.get("text", "") if isinstance(end, dict) else "").strip()
                if not text:
                    raise UserInputError("empty prompt", hint=f"write a prompt for {key.upper()} or pick an image")
                ends.append(("text", text))
        models = self.models
        with self._lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            codes = [pipeline.invert(models.clip, models.mapper, value.tensor) if kind == "image"
                     else pipeline.prompt_latents(models.clip, models.mapper, [value], prior=prior, seed=seed)
                     for kind, value in ends]
            w_plus = pipeline.interpolate(codes[0], codes[1], frames, spherical=spherical)
            images = pipeline.synthesize(models.generator, w_plus)
            names = [value.name if kind == "image" else value for kind, value in ends]
            stems = [Path(value.name).stem if kind == "image" else value for kind, value in ends]
            name = f"interp_{imageio.slugify(stems[0], 24)}_to_{imageio.slugify(stems[1], 24)}"
            folder = self._new_folder()
            records = imageio.write_interpolation_outputs(
                folder, name, images, gif=folder / f"{name}.gif", mp4=folder / f"{name}.mp4" if want_mp4 else None,
                fps=fps, metadata=output_metadata(models, a=names[0], b=names[1], seed=seed,
                                                  prior=pipeline.generation_prior(models.mapper, prior)))
            out = {"frames": [], "gif": None, "mp4": None}
            for record in records:
                url = self._publish(record["path"])
                if record["role"] == "frame":
                    out["frames"].append(url)
                else:
                    out[record["role"]] = url
        command = ["clip2gan", "interpolate", *names, "--frames", str(frames), "--fps", f"{fps:g}",
                   "--seed", str(seed), "--gif", f"{name}.gif"]
        if want_mp4:
            command += ["--mp4", f"{name}.mp4"]
        if spherical:
            command.append("--spherical")
        if prior is not None:
            command += ["--prior", prior]
        return {**out, "warnings": _warning_lines(caught), "command": shlex.join(command + self.spec.cli_args())}


def _integer(value: Any, what: str, low: int, high: int) -> int:
    try:
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be a whole number, got '{value}'") from None
    if not low <= number <= high:
        raise UserInputError(f"{what} must be between {low} and {high}, got {int(number)}")
    return int(number)


def _number(value: Any, what: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be a number, got '{value}'") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise UserInputError(f"{what} must be between {low:g} and {high:g}, got '{value}'")
    return number


def _warning_lines(caught) -> list[str]:
    return list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


def error_message(error: BaseException) -> str:
    """One line for the page: the project's message, or the first line of an unexpected error."""
    if isinstance(error, Clip2ganError):
        return error.one_line()
    return f"internal error: {first_line(error, 200)}"
