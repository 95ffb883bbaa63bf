"""Files in and out of the models: images, faces, latent codes, animations, command outputs, prompts.

Every write goes through `fileutil.atomic_path`: a failed or interrupted write leaves nothing behind.
The modules: `images` (read, convert, save), `faces` (MTCNN + FFHQ alignment), `latents` (W+ files),
`video` (GIF / MP4), `publish` (no-clobber names), `outputs` (what each command writes), `prompts`.
"""
from .faces import align_face, detect_face_landmarks
from .images import (IMAGE_FORMATS, MAX_PIXELS, MIN_SIDE, PNG_CHANNELS, as_pil, center_crop_resize,
                     load_image_tensor, make_grid, pil_to_tensor, read_image, read_png_metadata, save_image,
                     save_png, to_rgb, to_uint8)
from .latents import LATENT_KEY, load_latent, save_latent, sort_safetensors_header_bytes
from .outputs import (check_output_dir, edit_label, layers_label, slugify, write_edit_outputs,
                      write_generate_outputs, write_interpolation_outputs)
from .prompts import read_prompt_args
from .publish import publish_new_file, write_output
from .video import mp4_encoder, require_mp4_encoder, save_gif, save_mp4

__all__ = [
    "IMAGE_FORMATS", "LATENT_KEY", "MAX_PIXELS", "layers_label", "MIN_SIDE", "PNG_CHANNELS", "align_face", "as_pil",
    "center_crop_resize", "check_output_dir", "detect_face_landmarks", "edit_label", "load_image_tensor", "load_latent",
    "make_grid", "mp4_encoder", "pil_to_tensor", "publish_new_file", "read_image", "read_png_metadata",
    "read_prompt_args", "require_mp4_encoder", "save_gif", "save_image", "save_latent", "save_mp4", "save_png",
    "slugify", "sort_safetensors_header_bytes", "to_rgb", "to_uint8", "write_edit_outputs", "write_generate_outputs",
    "write_interpolation_outputs", "write_output",
]
