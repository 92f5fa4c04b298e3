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
        (["ingest", "--symbols", "BTCUSDT,btc"],
         "pipeline ingest: error: --symbols: 'btc' is not an upper-case Binance symbol"),
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
