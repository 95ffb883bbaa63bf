"""`clip2gan eval-fid`: --json and --report output, cache hit on a second run, bad inputs."""
from __future__ import annotations

import hashlib
import json

import pytest
from test_metrics_eval import write_noise_images, write_prompts
from tiny_models import register_tiny_pack

REPORT_KEYS = {"fid", "n_real", "n_fake", "features", "feature_weights_sha256", "versions"}


@pytest.fixture
def folders(tmp_path):
    return write_noise_images(tmp_path / "real", 6, seed=0), write_noise_images(tmp_path / "fake", 6, seed=1)


def clip_args(tiny_pack):
    return ["--features", "clip", "--pack", register_tiny_pack(tiny_pack, "tiny"), "--device", "cpu", "-q"]


def test_json_report_on_stdout_table_on_stderr(cli_runner, folders, tiny_pack, tmp_path):
    real, fake = folders
    report_file = tmp_path / "out" / "report.json"
    result = cli_runner(["eval-fid", "--real", real, "--fake", fake, *clip_args(tiny_pack), "--kid",
                         "--kid-subset-size", "4", "--kid-subsets", "5", "--json", "--report", report_file])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    assert REPORT_KEYS | {"kid_mean", "kid_std"} <= set(report)
    assert report["features"] == "clip" and report["n_real"] == report["n_fake"] == 6
    assert report["fid"] > 0
    assert report["feature_weights_sha256"] == hashlib.sha256(tiny_pack.clip_weights.read_bytes()).hexdigest()
    assert {"torch", "torch-fidelity", "open_clip", "clip2gan"} <= set(report["versions"])
    assert "FD_CLIP" in result.stderr
    assert json.loads(report_file.read_text()) == report


def test_table_on_stdout_without_json(cli_runner, folders, tiny_pack):
    real, fake = folders
    result = cli_runner(["eval-fid", "--real", real, "--fake", fake, *clip_args(tiny_pack)])
    assert result.exit_code == 0, result.output
    assert "FD_CLIP" in result.stdout and "real images" in result.stdout


def test_second_run_reads_real_statistics_from_the_cache(cli_runner, folders, tiny_pack, clip2gan_home):
    real, fake = folders
    args = ["eval-fid", "--real", real, "--fake", fake, *clip_args(tiny_pack), "--json"]
    first, second = json.loads(cli_runner(args).stdout), json.loads(cli_runner(args).stdout)
    assert (first["real_stats_cached"], second["real_stats_cached"]) == (False, True)
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert len(list((clip2gan_home / "stats").glob("*.npz"))) == 1
    third = json.loads(cli_runner(args + ["--no-cache"]).stdout)
    assert third["real_stats_cached"] is False


def test_prompts_report_clip_score_and_diversity(cli_runner, folders, tiny_pack, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")  # no AlexNet for LPIPS: the documented L1 fallback
    real, _ = folders
    prompts = write_prompts(tmp_path / "prompts.txt", "a red circle", "a blue square")
    result = cli_runner(["eval-fid", "--real", real, "--prompts", prompts, "-n", "3", *clip_args(tiny_pack),
                         "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_fake"] == 6 and report["n_prompts"] == 2
    assert 0 <= report["clip_score"] <= 100
    assert report["diversity_l1"] > 0 and "LPIPS unavailable" in report["diversity_note"]
    assert "diversity_lpips" not in report
    assert "LPIPS unavailable" in result.stderr


def test_inception_never_downloads_offline(cli_runner, folders, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    real, fake = folders
    result = cli_runner(["eval-fid", "--real", real, "--fake", fake, "--device", "cpu", "-q"])
    assert result.exit_code == 1
    assert "inception-fid" in result.stderr and "CLIP2GAN_OFFLINE" in result.stderr


@pytest.mark.slow
def test_inception_from_the_registry_cache_or_a_local_file(cli_runner, tmp_path, random_inception_weights,
                                                           monkeypatch):
    """The registry route passes the cached inception-fid file to torch-fidelity; --inception-weights a given one."""
    import shutil

    from clip2gan_cli import weights

    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")  # nothing may be downloaded
    entry = weights.load_registry().entry("inception-fid")
    cached = weights.cached_path(entry)
    cached.parent.mkdir(parents=True)
    shutil.copy(random_inception_weights, cached)
    cached.with_name(cached.name + ".sha256").write_text(entry.sha256 + "\n")  # as if fetched and verified

    real = write_noise_images(tmp_path / "real", 2, seed=0, size=24)
    fake = write_noise_images(tmp_path / "fake", 2, seed=1, size=32)  # another size: resized by the extractor
    common = ["eval-fid", "--real", real, "--fake", fake, "--device", "cpu", "-q", "--json"]
    from_registry = cli_runner(common)
    from_file = cli_runner(common + ["--inception-weights", random_inception_weights])
    assert from_registry.exit_code == 0 and from_file.exit_code == 0, from_registry.output + from_file.output
    registry_report, file_report = json.loads(from_registry.stdout), json.loads(from_file.stdout)
    assert registry_report["features"] == "inception" and registry_report["feature_dim"] == 2048
    assert registry_report["fid"] > 0
    assert registry_report["fid"] == pytest.approx(file_report["fid"], rel=1e-6)
    assert registry_report["feature_weights_sha256"] == entry.sha256
    assert file_report["feature_weights_sha256"] == hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
    assert "2048" in from_registry.stderr  # the warning that 2 images in 2048-d give a biased FID


# --------------------------------------------------------------------------- bad input


def run_error(cli_runner, args):
    result = cli_runner(["eval-fid", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_missing_real_folder(cli_runner, tmp_path, tiny_pack):
    fake = write_noise_images(tmp_path / "fake", 3, seed=0)
    assert "does not exist" in run_error(cli_runner, ["--real", tmp_path / "nope", "--fake", fake,
                                                      *clip_args(tiny_pack)])


def test_missing_folder_is_reported_before_any_weights_are_fetched(cli_runner, tmp_path, monkeypatch):
    from clip2gan_cli import weights

    monkeypatch.setattr(weights, "fetch", lambda *a, **k: pytest.fail("fetched weights before checking folders"))
    fake = write_noise_images(tmp_path / "fake", 3, seed=0)
    assert "does not exist" in run_error(cli_runner, ["--real", tmp_path / "nope", "--fake", fake])


def test_empty_fake_folder(cli_runner, folders, tmp_path, tiny_pack):
    (tmp_path / "empty").mkdir()
    real, _ = folders
    assert "holds no images" in run_error(cli_runner, ["--real", real, "--fake", tmp_path / "empty",
                                                       *clip_args(tiny_pack)])


def test_one_real_image_says_fid_needs_two(cli_runner, folders, tmp_path, tiny_pack):
    one = write_noise_images(tmp_path / "one", 1, seed=0)
    _, fake = folders
    assert "FID needs at least 2 images" in run_error(cli_runner, ["--real", one, "--fake", fake,
                                                                   *clip_args(tiny_pack)])


def test_kid_with_too_few_images_says_the_subset_size(cli_runner, folders, tiny_pack):
    real, fake = folders
    stderr = run_error(cli_runner, ["--real", real, "--fake", fake, *clip_args(tiny_pack), "--kid"])
    assert "at least 1000 images" in stderr and "--kid-subset-size" in stderr


def test_unreadable_files_are_skipped_with_a_count(cli_runner, folders, tiny_pack):
    real, fake = folders
    (fake / "broken.png").write_bytes(b"not a png")
    result = cli_runner(["eval-fid", "--real", real, "--fake", fake, *clip_args(tiny_pack), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["n_fake"], report["n_fake_skipped"]) == (6, 1)
    assert "skipped 1 unreadable file(s) in the fake folder" in result.stderr


def test_fake_and_prompts_together_are_refused(cli_runner, folders, tmp_path):
    real, fake = folders
    prompts = write_prompts(tmp_path / "p.txt", "a red circle")
    assert "not both" in run_error(cli_runner, ["--real", real, "--fake", fake, "--prompts", prompts, "-n", "2"])


def test_empty_prompts_file_is_refused(cli_runner, folders, tmp_path):
    real, _ = folders
    (tmp_path / "p.txt").write_text("\n# only a comment\n")
    assert "holds no prompt" in run_error(cli_runner, ["--real", real, "--prompts", tmp_path / "p.txt", "-n", "2"])


# --------------------------------------------------------------------------- stats files, report fields, scoring CLIP, FID modes


def test_save_stats_then_stats_gives_the_same_distance(cli_runner, folders, tiny_pack, tmp_path):
    real, fake = folders
    saved = tmp_path / "stats" / "real.npz"
    made = cli_runner(["eval-fid", "--real", real, "--save-stats", saved, *clip_args(tiny_pack), "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["n_real"] == 6 and saved.is_file()
    direct = json.loads(cli_runner(["eval-fid", "--real", real, "--fake", fake, *clip_args(tiny_pack),
                                    "--json"]).stdout)
    result = cli_runner(["eval-fid", "--stats", saved, "--fake", fake, *clip_args(tiny_pack), "--json"])
    assert result.exit_code == 0, result.output
    from_file = json.loads(result.stdout)
    assert from_file["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert from_file["stats_file"] == str(saved) and from_file["n_real"] == 6
    assert "precision" in direct and "precision" not in from_file  # P/R need the real features
    assert "precision/recall need --real DIR" in result.stderr


def test_report_names_mode_resize_weights_and_counts(cli_runner, folders, tiny_pack):
    real, fake = folders
    report = json.loads(cli_runner(["eval-fid", "--real", real, "--fake", fake, *clip_args(tiny_pack),
                                    "--json"]).stdout)
    assert {"fid_mode", "resize", "feature_weights_sha256", "n_real", "n_fake", "precision", "recall", "seed"} \
        <= set(report)
    assert report["fid_mode"] is None and "CLIP's own preprocessing" in report["resize"]
    assert report["fd_name"] == "FD_CLIP" and report["prc_k"] == 3


def test_score_clip_separate_from_the_packs_and_r_precision(cli_runner, folders, tiny_pack, tmp_path,
                                                            monkeypatch):
    from tiny_models import make_tiny_pack

    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    real, _ = folders
    other = make_tiny_pack(tmp_path / "other_clip", seed=1, with_mapper=False)
    prompts = write_prompts(tmp_path / "prompts.txt", "a red circle", "a blue square", "a green triangle")
    common = ["eval-fid", "--real", real, "--prompts", prompts, "-n", "2", *clip_args(tiny_pack), "--json"]
    own = cli_runner(common)
    separate = cli_runner(common + ["--score-clip", str(other.clip_config)])
    assert own.exit_code == 0 and separate.exit_code == 0, own.output + separate.output
    own_report, separate_report = json.loads(own.stdout), json.loads(separate.stdout)
    assert own_report["score_clip_is_generator_clip"] is True and "biased upward" in own.stderr
    assert separate_report["score_clip_is_generator_clip"] is False and "biased upward" not in separate.stderr
    assert separate_report["clip_score"] != own_report["clip_score"]
    assert own_report["fid"] == separate_report["fid"]  # the scoring CLIP changes only the prompt metrics
    for report in (own_report, separate_report):
        assert 0 <= report["r_precision"] <= 1 and report["r_precision_chance"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("extra, message", [
    (["--fid-mode", "tf2"], "unknown --fid-mode 'tf2'"),
    (["--fid-mode", "clean"], "--fid-mode clean applies to inception and dinov2"),
    (["--score-clip", "nocolon"], "malformed --score-clip 'nocolon'"),
    (["--prior", "dream"], "unknown --prior 'dream'"),
    (["--prior", "text"], "--prior only applies with --prompts"),
    (["--features", "vgg"], "unknown --features 'vgg'"),
    (["--precision", "fp8"], "unknown --precision 'fp8'"),
])
def test_new_flags_bad_values_give_one_line(cli_runner, folders, tiny_pack, extra, message):
    real, fake = folders
    assert message in run_error(cli_runner, ["--real", real, "--fake", fake, *clip_args(tiny_pack), *extra])


def test_stats_file_errors_give_one_line(cli_runner, folders, tiny_pack, tmp_path):
    import numpy as np

    real, fake = folders
    args = ["--fake", fake, *clip_args(tiny_pack)]
    assert "does not exist" in run_error(cli_runner, ["--stats", tmp_path / "none.npz", *args])
    assert "not both" in run_error(cli_runner, ["--real", real, "--stats", tmp_path / "none.npz", *args])
    np.savez(tmp_path / "legacy.npz", mu=np.zeros(4), sigma=np.eye(4), mode="legacy")
    assert "made in mode legacy; this run uses none" in run_error(cli_runner, ["--stats", tmp_path / "legacy.npz",
                                                                              *args])
    (tmp_path / "folder.npz").mkdir()
    assert "is a folder" in run_error(cli_runner, ["--real", real, "--save-stats", tmp_path / "folder.npz",
                                                   *clip_args(tiny_pack)])
    assert "--save-stats needs --real" in run_error(cli_runner, ["--stats", tmp_path / "legacy.npz", "--save-stats",
                                                                 tmp_path / "x.npz", *args])
    assert "--kid needs the real images" in run_error(cli_runner, ["--stats", tmp_path / "legacy.npz", "--kid",
                                                                   *args])


def test_dinov2_never_downloads_offline(cli_runner, folders, monkeypatch):
    monkeypatch.setenv("CLIP2GAN_OFFLINE", "1")
    real, fake = folders
    stderr = run_error(cli_runner, ["--real", real, "--fake", fake, "--features", "dinov2", "--device", "cpu", "-q"])
    assert "dinov2-vit-l-14" in stderr and "CLIP2GAN_OFFLINE" in stderr


@pytest.mark.slow
def test_fid_mode_is_reported_and_cached_apart(cli_runner, tmp_path, random_inception_weights, clip2gan_home):
    real = write_noise_images(tmp_path / "real", 2, seed=0, size=24)
    fake = write_noise_images(tmp_path / "fake", 2, seed=1, size=24)
    common = ["eval-fid", "--real", real, "--fake", fake, "--inception-weights", random_inception_weights,
              "--device", "cpu", "-q", "--json"]
    legacy, clean = (cli_runner(common + ["--fid-mode", mode]) for mode in ("legacy", "clean"))
    assert legacy.exit_code == 0 and clean.exit_code == 0, legacy.output + clean.output
    legacy_report, clean_report = json.loads(legacy.stdout), json.loads(clean.stdout)
    assert (legacy_report["fid_mode"], clean_report["fid_mode"]) == ("legacy", "clean")
    assert "TF1" in legacy_report["resize"] and "clean-fid" in clean_report["resize"]
    assert legacy_report["feature_weights_sha256"] == clean_report["feature_weights_sha256"]
    assert legacy_report["fid"] != pytest.approx(clean_report["fid"], rel=1e-6)
    assert clean_report["real_stats_cached"] is False  # the legacy entry is not reused
    assert len(list((clip2gan_home / "stats").glob("*.npz"))) == 2
