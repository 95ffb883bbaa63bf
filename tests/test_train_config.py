"""TrainConfig: TOML in and out, overrides, unknown keys and bad values rejected by name, --dry-run."""
from __future__ import annotations

from clip2gan_cli import tomlio

import pytest

from clip2gan_cli.errors import UserInputError
from clip2gan_cli.train.config import TrainConfig, load_config, load_run_config, parse_override


def test_defaults_are_valid_and_round_trip_through_toml():
    config = TrainConfig(sample_prompts=['a "quoted" prompt', "back\\slash", "tab\there"], lr=3e-5)
    text = config.to_toml()
    assert TrainConfig.from_dict(tomlio.loads(text)) == config
    assert "lambda_div = 0.1" in text and "div_mode = \"multiplicative\"" in text


def test_file_then_overrides_win_in_order(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("steps = 50\nlambda_div = 0.5\nlpips_net = \"vgg\"\n")
    config = load_config(path, {"steps": 7})
    assert (config.steps, config.lambda_div, config.lpips_net) == (7, 0.5, "vgg")


def test_unknown_key_is_rejected_by_name(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("steps = 5\nlamda_rec = 1.0\n")
    with pytest.raises(UserInputError, match="unknown key 'lamda_rec'"):
        load_config(path)
    with pytest.raises(UserInputError, match="unknown key 'batchsize'"):
        load_config(None, {"batchsize": 4})


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"lambda_adv": -0.1}, "lambda_adv must be >= 0"),
    ({"ema_decay": 1.5}, "ema_decay must be in"),
    ({"div_mode": "gaussian"}, "div_mode must be one of"),
    ({"lpips_net": "squeeze"}, "lpips_net must be one of"),
    ({"batch_size": "8"}, "batch_size' expects int"),
    ({"compile": 1}, "compile' expects bool"),
    ({"synthetic_ratio": 0.5}, "needs `data` DIR"),  # the CLI says --data DIR
    ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
])
def test_bad_values_are_rejected_naming_the_key(values, message):
    with pytest.raises(UserInputError, match=message):
        load_config(None, values)


def test_malformed_toml_and_missing_file_are_user_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(UserInputError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UserInputError, match="no config.toml"):
        load_run_config(tmp_path)


def test_override_values_are_read_as_toml_with_bare_words_as_strings():
    assert parse_override("steps=10") == ("steps", 10)
    assert parse_override("lr = 1e-3") == ("lr", 0.001)
    assert parse_override("compile=true") == ("compile", True)
    assert parse_override("lpips_net=vgg") == ("lpips_net", "vgg")
    assert parse_override('sample_prompts=["a", "b"]') == ("sample_prompts", ["a", "b"])
    with pytest.raises(UserInputError, match="expected key=value"):
        parse_override("steps")


def test_cli_dry_run_prints_the_resolved_config(clip2gan_subprocess, tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("lambda_id = 0.0\n")
    result = clip2gan_subprocess(["train", "--pack", "shapes", "--config", path, "--steps", "12",
                                  "--set", "div_mode=additive", "--dry-run"])
    assert result.returncode == 0, result.stderr
    printed = TrainConfig.from_dict(tomlio.loads(result.stdout))
    assert (printed.pack, printed.steps, printed.lambda_id, printed.div_mode) == ("shapes", 12, 0.0, "additive")


def test_cli_unknown_override_key_exits_1_naming_it(cli_runner):
    result = cli_runner(["train", "--pack", "shapes", "--set", "lambda_foo=1", "--dry-run"])
    assert result.exit_code == 1
    assert "unknown key 'lambda_foo'" in result.output


def test_cosine_schedule_starts_at_lr_halves_midway_and_ends_at_zero():
    from clip2gan_cli.train.config import learning_rate

    cosine = TrainConfig(lr=4e-4, steps=100, lr_schedule="cosine")
    assert learning_rate(cosine, 0) == pytest.approx(4e-4)
    assert learning_rate(cosine, 50) == pytest.approx(2e-4)
    assert learning_rate(cosine, 100) == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(cosine, step) for step in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    constant = TrainConfig(lr=4e-4, steps=100)
    assert {learning_rate(constant, step) for step in (0, 50, 99)} == {4e-4}
