"""Recipe configs and the CLI's option handling: every bad option fails with what is allowed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from equilibria.zoo import RECIPES, RecipeError, get_recipe
from equilibria.zoo.cli import main
from equilibria.zoo.compare import CompareConfig
from equilibria.zoo.config import (
    ConfigError,
    ConfigTypeError,
    check_range,
    from_dict,
    parse_options,
    to_dict,
)
from equilibria.zoo.digits import DigitsConfig, DigitsTask
from equilibria.zoo.mosaic import MosaicConfig, MosaicTask

# (command-line options, message fragments)
BAD_OPTIONS = [
    (["--phantom-stpes", "3"], ["'--phantom-stpes'", "did you mean '--phantom-steps'", "--width"]),
    (["--nonsense"], ["unknown option", "allowed options", "--backward {implicit,phantom"]),
    (["--solver", "newton"], ["--solver", "invalid choice", "'anderson'", "'broyden'"]),
    (["--backward", "exact"], ["--backward", "'implicit'", "'unrolled'"]),
    (["--lr", "abc"], ["--lr", "expected float", "'abc'"]),
    (["--epochs", "2.5"], ["--epochs", "expected int"]),
    (["--lr", "-1"], ["lr must be in (0, inf)", "-1"]),
    (["--phantom-damping", "1.5"], ["phantom_damping must be in (0, 1]", "1.5"]),
    (["--max-iter", "0"], ["max_iter must be in [1, inf)", "0"]),
    (["--width", "30", "--groups", "4"], ["groups must divide width", "groups=4", "width=30"]),
    (["--train-subset", "10"], ["train_subset must be 0 or >= batch_size=64", "10"]),
    (["--train-subset", "5000"], ["train_subset must be in [0, 1437]", "5000"]),
    (
        ["--backward", "implicit", "--correction-states", "3"],
        ["correction_states=3 needs backward 'phantom' or 'jfb'", "'implicit'"],
    ),
    (["--batch-size", "2000"], ["batch_size must be <= 1437", "got 2000"]),
    (["--seed", "5000000000"], ["seed must be in [0, 4294967295]", "got 5000000000"]),
    (["--seed", "-1"], ["seed must be in [0, 4294967295]", "got -1"]),
    (["--epochs", str(10**400)], ["epochs must be in [1, inf)", "got 1000"]),
    (["--resume"], ["resume needs run_dir"]),
    (["--epochs"], ["--epochs", "expected one argument"]),
]


@pytest.mark.parametrize(("argv", "fragments"), BAD_OPTIONS)
def test_bad_options_name_what_is_allowed(argv: list[str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_options(DigitsConfig, argv, prog="equilibria train digits")
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "exc", "fragment"),
    [
        ("width", "32", ConfigTypeError, "width must be int, got '32'"),
        ("width", True, ConfigTypeError, "width must be int, got True"),
        ("lr", float("nan"), ConfigError, "lr must be finite, got nan"),
        ("augment", 1, ConfigTypeError, "augment must be true or false, got 1"),
        ("dtype", "float16", ConfigError, r"dtype must be one of \('float32', 'float64'\), got"),
    ],
)
def test_config_type_errors(field: str, value: object, exc: type, fragment: str) -> None:
    with pytest.raises(exc, match=fragment) as info:
        DigitsConfig(**{field: value})
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, TypeError) == (exc is ConfigTypeError)


def test_options_parse_into_typed_config() -> None:
    config = parse_options(
        DigitsConfig,
        ["--backward", "neumann", "--phantom-steps", "7", "--lr", "1e-3", "--no-augment"],
        prog="t",
    )
    assert config.backward == "neumann" and config.phantom_steps == 7
    assert config.lr == 1e-3 and config.augment is False
    assert config.width == DigitsConfig().width  # untouched options keep their defaults


def test_config_json_round_trip_and_unknown_key() -> None:
    config = DigitsConfig(backward="implicit", lr=1e-3)
    assert from_dict(DigitsConfig, to_dict(config)) == config
    with pytest.raises(ConfigError, match=r"unknown option.*'learning_rate'"):
        from_dict(DigitsConfig, {**to_dict(config), "learning_rate": 1.0})


def test_ints_are_accepted_for_floats() -> None:
    assert DigitsConfig(lr=1).lr == 1.0
    assert isinstance(DigitsConfig(lr=1).lr, float)


def test_compare_config_errors() -> None:
    with pytest.raises(ConfigError, match="methods must be distinct"):
        CompareConfig(methods=("implicit", "implicit"))
    with pytest.raises(ConfigError, match="methods must be one of"):
        CompareConfig(methods=("implicit", "exact"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="memory_iters"):
        CompareConfig(memory_iters=(0, 10))
    config = parse_options(CompareConfig, ["--methods", "jfb", "phantom", "--seeds", "2"], prog="t")
    assert config.methods == ("jfb", "phantom") and config.seeds == 2


def test_registry() -> None:
    recipe = get_recipe("digits")
    assert recipe.config_class() is DigitsConfig
    assert callable(recipe.train_function()) and recipe.task_class() is DigitsTask
    assert get_recipe("mosaic").task_class() is MosaicTask
    with pytest.raises(RecipeError, match=r"unknown recipe 'cifar'.*digits"):
        get_recipe("cifar")


def test_cli_errors_exit_2_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "digits", "--lr", "0"]) == 2
    err = capsys.readouterr().err
    assert "equilibria: error:" in err and "lr must be in (0, inf)" in err
    assert main(["train", "nope"]) == 2
    assert "available recipes: digits" in capsys.readouterr().err
    assert main(["train", "digits", "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) for DigitsConfig: '--bogus'" in err and "allowed options:" in err
    assert "--phantom-damping float (default: 0.5)" in err  # the list uses plain type names
    assert "--phantom-damping FLOAT" not in err


def test_cli_help_lists_recipes_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "digits", "--help"]) == 0
    out = capsys.readouterr().out
    for fragment in ("--backward {implicit,phantom,neumann,jfb,unrolled}", "--resume", "default"):
        assert fragment in out
    assert main(["compare-gradients", "digits", "--help"]) == 0
    assert "--methods" in capsys.readouterr().out
    assert main(["sweep", "mosaic", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--seeds" in out and "options of every mosaic run" in out and "--block" in out
    assert "variants of mosaic: conv only," in out and "runs/sweep-mosaic/<timestamp>" in out
    assert main(["recipes"]) == 0
    assert "digits" in capsys.readouterr().out
    # without a recipe: the recipe list (argparse rejected --help there, exit 2)
    for command in ("train", "compare-gradients"):
        for flag in ("--help", "-h"):
            assert main([command, flag]) == 0
            out = capsys.readouterr().out
            assert "digits" in out and "mosaic" in out and f"{command} RECIPE --help" in out
    assert main(["train"]) == 2  # no recipe: the same list, as an error
    captured = capsys.readouterr()
    assert "recipes:" in captured.out
    names = ", ".join(RECIPES)  # every registered recipe, in registration order
    assert captured.err == f"equilibria: error: train needs a RECIPE: one of {names}\n"
    assert main(["eval"]) == 2  # no checkpoint: the usage line and an error line
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: equilibria eval CHECKPOINT")
    assert captured.err.startswith("equilibria: error: eval needs a CHECKPOINT")
    assert main(["train", "--help", "digits"]) == 0  # the recipe's options, not a training run
    assert "--backward" in capsys.readouterr().out
    # an option whose help names its effective default gets no second, literal one
    assert main(["train", "digits", "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/digits/<timestamp>)" in flat and "(default: '')" not in flat


def test_every_option_has_help() -> None:
    for cls in (DigitsConfig, CompareConfig, MosaicConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_import_equilibria_stays_light_and_python_m_works() -> None:
    # (tqdm is not checked: torch itself imports it, through torch.hub)
    code = (
        "import sys, equilibria; "
        "heavy = [m for m in ('equilibria.zoo', 'sklearn', 'matplotlib', 'safetensors') "
        "if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "equilibria", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "compare-gradients" in out and "digits" in out


def test_mosaic_recipe_is_reachable_through_the_registry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = get_recipe("mosaic")
    assert recipe.config_class() is MosaicConfig
    assert main(["train", "mosaic", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--block {conv,attention,ham}" in out and "--run-dir" in out
    flat = " ".join(out.split())  # argparse wraps the help lines
    assert "global-context block after the conv stem" in flat and "(default: ham)" in flat
    assert main(["train", "mosaic", "--blok", "ham"]) == 2
    assert "did you mean '--block'" in capsys.readouterr().err
    assert main(["eval", "nonexistent.safetensors"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


# mosaic errors have the same form as digits': config class, option, value, what is allowed
MOSAIC_BAD = [
    ({"lr": 0}, ConfigError, "MosaicConfig: lr must be in (0, inf), got 0.0"),
    ({"weight_decay": -1}, ConfigError, "MosaicConfig: weight_decay must be in [0, inf), got -1.0"),
    ({"lr": float("inf")}, ConfigError, "MosaicConfig: lr must be finite, got inf"),
    (
        {"grid": 2, "channels": 128, "rank": 65},
        ConfigError,
        "MosaicConfig: rank must be <= 64 (the positions of the context block for grid=2), got 65",
    ),
    ({"channels": 8, "rank": 9}, ConfigError, "MosaicConfig: rank must be in [1, 8], got 9"),
    ({"seed": 2**32}, ConfigError, "MosaicConfig: seed must be in [0, 4294967295], got 4294967296"),
    ({"occupancy": 0}, ConfigError, "MosaicConfig: occupancy must be in (0, 1], got 0.0"),
    ({"threads": -1}, ConfigError, "MosaicConfig: threads must be in [0, 256], got -1"),
    (  # a saved config asked for 4e9 test pixels (about 200 GB while drawn)
        {"grid": 8, "test_canvases": 10**6},
        ConfigError,
        "MosaicConfig: test_canvases must be <= 16384 for grid=8 (at most 67,108,864 test "
        "pixels, built at once), got 1000000",
    ),
    ({"steps": 2.5}, ConfigTypeError, "MosaicConfig: steps must be int, got 2.5"),
    (
        {"resume": True},
        ConfigError,
        "MosaicConfig: resume needs run_dir (the folder of the run to continue)",
    ),
    (
        {"block": "mlp"},
        ConfigError,
        "MosaicConfig: block must be one of ('conv', 'attention', 'ham'), got 'mlp'",
    ),
]


@pytest.mark.parametrize(("options", "exc", "message"), MOSAIC_BAD)
def test_mosaic_config_errors_name_option_value_and_allowed(
    options: dict[str, object], exc: type, message: str
) -> None:
    with pytest.raises(exc) as info:
        MosaicConfig(**options)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_mosaic_threads_follow_the_run_options(capsys: pytest.CaptureFixture[str]) -> None:
    """0 is torch's default, as for every recipe (mosaic refused it though its help referred to
    the run options, which allow it)."""
    assert MosaicConfig(threads=0).threads == 0
    assert main(["train", "mosaic", "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "--threads INT torch CPU threads (0 = torch's default)" in flat


def test_mosaic_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "mosaic", "--lr", "0"]) == 2
    assert "MosaicConfig: lr must be in (0, inf), got 0.0" in capsys.readouterr().err
    with pytest.raises(ConfigError) as info:
        from_dict(MosaicConfig, {"stpes": 3})
    message = str(info.value)
    assert message.startswith("unknown option(s) for MosaicConfig: 'stpes' (did you mean 'steps'?)")
    assert "--rank int (default: 16)" in message


def test_check_range_keeps_the_value_as_given() -> None:
    config = DigitsConfig()
    object.__setattr__(config, "width", 0)
    with pytest.raises(ConfigError) as info:
        check_range(config, "width", low=1)
    assert str(info.value) == "DigitsConfig: width must be in [1, inf), got 0"
    object.__setattr__(config, "lr", 2.0)
    with pytest.raises(ConfigError) as info:
        check_range(config, "lr", low=0, high=1, low_open=True)
    assert str(info.value) == "DigitsConfig: lr must be in (0, 1], got 2.0"
