"""One corpus of hostile checkpoints, tried at every entry point that reads a checkpoint file.

tests/test_hostile_checkpoints.py proves each payload against `load_generator` (and proves, with
control tests, that each payload does create its marker under plain pickle). Here the same
payloads go through the user-facing doors:

- `download-weights` of a registry file served over HTTP (the fetched file is converted),
- `generate --generator FILE` (load_generator behind the CLI),
- `generate --mapper FILE` (a pickle renamed `.safetensors`),
- `edit --latent FILE` / `interpolate FILE ...` (latent files),
- `train --resume RUN` (checkpoints/step-N.pt replaced by the payload),
- `eval-fid --inception-weights FILE`,

and each must exit 1 with one `Error:` line while the payload's marker file never appears.
"""
from __future__ import annotations

import hashlib
import pickle
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

import test_hostile_checkpoints as hostile
from _nvidia_pickles import dumps_snapshot, touch_code
from cli_helpers import assert_one_line_error, written_files
from file_server import write_registry
from test_metrics_eval import write_noise_images

PAYLOAD_NAMES = ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "importlib.import_module"]


def _torch_bytes(obj, legacy: bool) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def corpus(marker: Path, tiny_state: dict) -> dict[str, bytes]:
    """name -> file bytes; each file would create `marker` (or allocate absurdly) if loaded naively."""
    payloads = hostile._payloads(marker)
    files = {}
    for name in PAYLOAD_NAMES:
        files[f"pkl-{name}"] = dumps_snapshot(tiny_state, None, protocol=4, extra={"augment_pipe": payloads[name]})
        files[f"pt-zip-{name}"] = _torch_bytes({"g_ema": {"input.input": torch.zeros(1, 4, 4, 4)},
                                                "args": payloads[name]}, legacy=False)
    files["pt-legacy-builtins.exec"] = _torch_bytes({"g_ema": {}, "args": payloads["builtins.exec"]}, legacy=True)
    command = f"touch '{marker}'".encode()
    files["pkl-hand-written-GLOBAL"] = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    blob = hostile._legacy_blob(pickle.dumps(payloads["posix.system"], protocol=2), ["0"], b"")
    files["pkl-nested-pickle-in-storage"] = hostile._with_tensor(
        tiny_state, hostile._TensorOver(hostile._HostileStorage(blob), (4,), (1,)))
    huge = 1 << 40
    blob = hostile._legacy_blob(hostile._storage_main_pickle(huge), ["0"], struct.pack("<q", huge) + b"\0" * 8)
    files["pkl-oversized-storage-count"] = hostile._with_tensor(
        tiny_state, hostile._TensorOver(hostile._HostileStorage(blob), (4,), (1,)))
    files["pkl-oversized-length-field"] = b"\x80\x04" + pickle.BINBYTES8 + struct.pack("<Q", 1 << 62) + b"tiny."
    return files


CORPUS_NAMES = sorted([f"{kind}-{name}" for kind in ("pkl", "pt-zip") for name in PAYLOAD_NAMES] + [
    "pt-legacy-builtins.exec", "pkl-hand-written-GLOBAL", "pkl-nested-pickle-in-storage", "pkl-oversized-storage-count",
    "pkl-oversized-length-field"])


@pytest.fixture(params=CORPUS_NAMES)
def hostile_file(request, marker, tiny_state) -> tuple[str, bytes]:
    return request.param, corpus(marker, tiny_state)[request.param]


def _assert_marker_absent(marker: Path) -> None:
    time.sleep(0.05)  # a spawned process would have had time to run
    assert not marker.exists(), "the payload ran"


def test_download_weights_refuses_to_convert_a_hostile_checkpoint(server, tmp_path, cli_runner, clip2gan_home,
                                                                 hostile_file, marker):
    name, data = hostile_file
    fmt = "rosinality-pt" if name.startswith("pt-") else "nvidia-pkl"
    url = server.add(f"/{name}.bin", body=data)
    registry = write_registry(tmp_path / "reg.toml", {"evil": {"url": url, "format": fmt,
                                                               "sha256": hashlib.sha256(data).hexdigest(),
                                                               "size": len(data)}})
    result = cli_runner(["download-weights", "evil", "-q", "--registry", registry])
    assert_one_line_error(result)
    _assert_marker_absent(marker)
    converted = clip2gan_home / "converted"
    assert not converted.exists() or not any(converted.iterdir()), "nothing may be converted from a refused file"


def test_download_weights_converts_a_pickle_whose_only_payload_is_module_src(server, tmp_path, cli_runner,
                                                                            clip2gan_home, marker, tiny_state):
    # NVIDIA's loader would exec module_src; ours never reads it, so the weights convert and nothing runs.
    data = dumps_snapshot(tiny_state, None, module_src=touch_code(marker) + "\nclass Generator: pass\n")
    url = server.add("/src.pkl", body=data)
    registry = write_registry(tmp_path / "reg.toml", {"src": {"url": url, "format": "nvidia-pkl",
                                                              "sha256": hashlib.sha256(data).hexdigest()}})
    result = cli_runner(["download-weights", "src", "-q", "--registry", registry])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[1].endswith(".G.safetensors")
    _assert_marker_absent(marker)


def test_generate_refuses_a_hostile_generator_file(cli_runner, tiny_pack, tmp_path, hostile_file, marker,
                                                   clip2gan_home):
    name, data = hostile_file
    path = tmp_path / f"{name}.{'pt' if name.startswith('pt-') else 'pkl'}"
    path.write_bytes(data)
    result = cli_runner(["generate", "a red circle", "--mapper", tiny_pack.mapper, "--generator", path,
                         "--clip", tiny_pack.clip_config, "--out", tmp_path / "out"])
    assert_one_line_error(result)
    _assert_marker_absent(marker)
    assert written_files(tmp_path / "out") == []
    assert not (clip2gan_home / "converted").exists() or not any((clip2gan_home / "converted").iterdir())


def test_generate_refuses_a_hostile_file_renamed_to_safetensors_as_mapper(cli_runner, tiny_pack, tmp_path,
                                                                          hostile_file, marker):
    name, data = hostile_file
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    result = cli_runner(["generate", "a red circle", "--mapper", path, "--generator", tiny_pack.generator,
                         "--clip", tiny_pack.clip_config, "--out", tmp_path / "out"])
    assert_one_line_error(result, path.name)
    _assert_marker_absent(marker)
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize("name", ["pkl-posix.system", "pt-zip-builtins.eval", "pkl-nested-pickle-in-storage"])
def test_edit_and_interpolate_refuse_a_hostile_latent_file(cli_runner, tiny_pack, tmp_path, marker, tiny_state,
                                                           name):
    from PIL import Image

    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(corpus(marker, tiny_state)[name])
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    for args in (["edit", image, "blue", "--latent", path], ["interpolate", path, "blue"]):
        result = cli_runner([*args, *tiny_pack.cli_args(), "--out", tmp_path / "out"])
        assert_one_line_error(result, path.name)
    _assert_marker_absent(marker)
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize("name", [n for n in CORPUS_NAMES if n.startswith("pt-")] + ["pkl-posix.system"])
def test_eval_fid_refuses_hostile_inception_weights(cli_runner, tmp_path, marker, tiny_state, name):
    real = write_noise_images(tmp_path / "real", 2, seed=0)
    path = tmp_path / f"{name}.pth"
    path.write_bytes(corpus(marker, tiny_state)[name])
    result = cli_runner(["eval-fid", "--real", real, "--fake", real, "--inception-weights", path, "-q",
                         "--device", "cpu", "--no-cache"])
    assert_one_line_error(result)
    _assert_marker_absent(marker)


# ----------------------------------------------------------------------------------------------
# train --resume


TRAIN_FLAGS = ["--device", "cpu", "--no-progress", "--set", "lpips_net=none", "--set", "lambda_adv=0",
               "--set", "batch_size=2", "--set", "mapper_hidden_dim=32", "--set", "num_sample_images=2",
               "--set", "checkpoint_every=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_pack):
    """A 2-step run (checkpoints at steps 1 and 2) made once; tests copy it."""
    from typer.testing import CliRunner

    from clip2gan_cli.cli import app

    run = tmp_path_factory.mktemp("hostile_resume") / "run"
    result = CliRunner().invoke(app, ["train", "--generator", str(tiny_pack.generator), "--clip",
                                      str(tiny_pack.clip_config), "--data", "synthetic", "--out", str(run),
                                      "--steps", "2", *TRAIN_FLAGS])
    assert result.exit_code == 0, result.output
    return run


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_train_resume_refuses_a_hostile_checkpoint(cli_runner, trained_run, tmp_path, hostile_file, marker):
    name, data = hostile_file
    run = _copy_run(trained_run, tmp_path)
    for checkpoint in (run / "checkpoints").glob("step-*.pt"):
        checkpoint.write_bytes(data)
    mapper_before = (run / "mapper.safetensors").read_bytes()
    result = cli_runner(["train", "--resume", run, "--steps", "3", "--no-progress"])
    assert_one_line_error(result, "no readable checkpoint")
    _assert_marker_absent(marker)
    assert (run / "mapper.safetensors").read_bytes() == mapper_before


def test_train_resume_skips_a_hostile_newest_checkpoint_and_uses_the_previous_one(cli_runner, trained_run, tmp_path,
                                                                                 marker, tiny_state):
    run = _copy_run(trained_run, tmp_path)
    (run / "checkpoints" / "step-00000002.pt").write_bytes(corpus(marker, tiny_state)["pt-zip-posix.system"])
    result = cli_runner(["train", "--resume", run, "--steps", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Skipped unreadable checkpoint(s): step-00000002.pt" in result.stderr
    assert "Resuming" in result.stderr and "from step 1" in result.stderr
    _assert_marker_absent(marker)


@pytest.mark.parametrize("damage", ["mapper-tensors-of-another-shape", "optimizer-state-missing", "step-not-a-number"])
def test_train_resume_refuses_a_well_formed_checkpoint_that_does_not_fit(cli_runner, trained_run, tmp_path, damage):
    run = _copy_run(trained_run, tmp_path)
    newest = run / "checkpoints" / "step-00000002.pt"
    state = torch.load(newest, weights_only=True)
    if damage == "mapper-tensors-of-another-shape":
        state["mapper"] = {key: torch.zeros(3, *value.shape[1:]) for key, value in state["mapper"].items()}
    elif damage == "optimizer-state-missing":
        del state["opt_m"]
    else:
        state["step"] = "two"
    torch.save(state, newest)
    result = cli_runner(["train", "--resume", run, "--steps", "3", "--no-progress"])
    assert_one_line_error(result, "newest checkpoint in", "does not fit this run")
