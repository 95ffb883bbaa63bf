"""text_tower: open_clip's text encoder rebuilt without importing open_clip, for text-only commands."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tiny_models import tiny_clip_config


def _save_clip(tmp_path, config: dict, seed: int = 0):
    """A random open_clip CLIP from `config` saved like a pack's clip.safetensors + clip_config.json."""
    import json

    from safetensors.torch import save_file

    from clip2gan_cli.clip import build_clip_module, resolve_clip_config

    torch.manual_seed(seed)
    model = build_clip_module(resolve_clip_config("tiny-clip", None, config))
    for parameter in model.parameters():  # open_clip zero-inits some biases: randomise everything
        torch.nn.init.normal_(parameter, std=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "clip_config.json").write_text(json.dumps(config))
    return tmp_path / "clip_config.json"


PROMPTS = ["a red circle", "a small blue triangle on a black background", "red", "a", "a green cross"]


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_text_only_features_equal_open_clips(tmp_path, quick_gelu):
    from clip2gan_cli.clip import load_clip_from_config_file
    from clip2gan_cli.text_tower import TextTower

    config = tiny_clip_config()
    config["model_cfg"]["text_cfg"].update(layers=2, mlp_ratio=2.0)
    config["model_cfg"]["quick_gelu"] = quick_gelu
    path = _save_clip(tmp_path, config)
    full = load_clip_from_config_file(path, device="cpu")
    text_only = load_clip_from_config_file(path, device="cpu", text_only=True)
    assert isinstance(text_only.model, TextTower) and not isinstance(full.model, TextTower)
    torch.testing.assert_close(text_only.encode_text(PROMPTS), full.encode_text(PROMPTS), rtol=1e-5, atol=1e-6)
    assert text_only.embed_dim == full.embed_dim
    with pytest.raises(RuntimeError, match="text-only"):
        text_only.encode_image(torch.zeros(1, 3, 16, 16))


def test_the_builtin_packs_text_features_are_unchanged():
    from clip2gan_cli.packs import load_pack

    words = ["a", "small", "large", "red", "cyan", "circle", "cross", "on", "white", "background", "picture", "of"]
    prompts = [" ".join(words[i:i + k]) for k in (1, 3, 6) for i in range(0, len(words) - k + 1, 2)]
    full = load_pack(device="cpu").clip
    text_only = load_pack(device="cpu", text_only=True).clip
    torch.testing.assert_close(text_only.encode_text(prompts), full.encode_text(prompts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option, value", [("pool_type", "eos"), ("no_causal_mask", True), ("proj_bias", True),
                                           ("ls_init_value", 0.1), ("unheard_of", 1)])
def test_any_other_text_option_loads_through_open_clip(tmp_path, option, value):
    from clip2gan_cli import text_tower

    config = tiny_clip_config()
    assert text_tower.supports(config["model_cfg"])
    config["model_cfg"]["text_cfg"][option] = value
    assert not text_tower.supports(config["model_cfg"])
    if option != "unheard_of":  # open_clip itself refuses unknown options
        from clip2gan_cli.clip import load_clip_from_config_file

        path = _save_clip(tmp_path, config)
        assert not isinstance(load_clip_from_config_file(path, device="cpu", text_only=True).model,
                              text_tower.TextTower)


def test_a_corrupt_weights_file_is_a_one_line_checkpoint_error(tmp_path):
    from clip2gan_cli.clip import load_clip_from_config_file
    from clip2gan_cli.errors import CheckpointError

    path = _save_clip(tmp_path, tiny_clip_config())
    (tmp_path / "clip.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match="cannot load CLIP weights clip.safetensors"):
        load_clip_from_config_file(path, device="cpu", text_only=True)


def test_generate_on_the_builtin_pack_never_imports_open_clip(tmp_path):
    code = ("import sys\nfrom clip2gan_cli.cli import main\n"
            f"sys.argv = ['clip2gan', 'generate', 'a red circle', '-n', '1', '--out', {str(tmp_path)!r}]\n"
            "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
            "print(sorted(m for m in ('open_clip', 'torchvision', 'torch._dynamo') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert list(tmp_path.glob("*.png"))
