import pytest

from pipeline.cli import build_parser, main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["no-such-command"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [  # flags generated from the config types keep the messages they always had
        (["ingest", "--ring-capacity", "3000"],
         "pipeline ingest: error: --ring-capacity: must be a power of two >= 2, got 3000"),
        (["ingest", "--symbols", "BTCUSDT,btc-usd"],
         "pipeline ingest: error: --symbols: 'btc-usd' is not a Binance symbol"),
        (["sim", "--rate", "-1"], "pipeline sim: --rate must be >= 0"),
        (["sim", "--api-key", "nokey"],
         "pipeline sim: --api-key must be NAME=PUBLIC_KEY_PEM_PATH, got 'nokey'"),
    ],
)  # fmt: skip
def test_bad_flags_are_usage_errors_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_flag_type_is_argparse_s_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "--ring-capacity", "many"])
    assert exc.value.code == 2
    assert "argument --ring-capacity: invalid int value: 'many'" in capsys.readouterr().err


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib
    from pathlib import Path

    import pipeline

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pipeline {declared}"
    assert pipeline.__version__ == declared


def _bash_complete(script: str, words: list[str]) -> list[str]:
    """What the generated bash completion offers for the last (partial) word of ``words``."""
    import shlex
    import subprocess

    array = " ".join(shlex.quote(w) for w in words)
    probe = (
        f"source /dev/stdin <<'EOF_SCRIPT'\n{script}\nEOF_SCRIPT\n"
        f"COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; "
        f"COMP_LINE={shlex.quote(' '.join(words))}; "
        'COMP_POINT=${#COMP_LINE}; _shtab_pipeline; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", probe], check=True, capture_output=True, text=True)
    return out.stdout.split()


def test_bash_completion_offers_commands_consumers_and_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert _bash_complete(script, ["pipeline", "cons"]) == ["consume"]
    consumers = set(_bash_complete(script, ["pipeline", "consume", ""]))
    assert {"monitor", "persist", "risk"} <= consumers
    assert "--ring-capacity" in _bash_complete(script, ["pipeline", "ingest", "--ring-c"])
    assert _bash_complete(script, ["pipeline", "completion", ""]) == ["bash", "zsh"]


def test_zsh_completion_is_a_compdef_for_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil
    import subprocess

    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef pipeline")
    for command in ("run", "ingest", "consume", "trade", "health", "completion"):
        assert f"\n    {command}:'" in script, command
    if shutil.which("zsh"):  # parse it where zsh exists (not installed on every CI machine)
        subprocess.run(["zsh", "-n"], input=script, text=True, check=True)
