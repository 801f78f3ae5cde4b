"""The ``ftune`` command: each subcommand's usage line names the command the user typed."""

from __future__ import annotations

import pytest

from ftune.entrypoint import prog
from ftune_cli import command as cli


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_subcommand_help_names_ftune_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ftune {command} "), out[:200]
    assert "python -m" not in out.splitlines()[0]


def test_module_form_keeps_its_own_name(capsys):
    import serve.cli
    import train.job
    import tune.sweep

    for parse, module_form in ((tune.sweep.parse_args, "python -m tune"), (train.job.parse_args, "python -m train"),
                               (serve.cli.build_parser().parse_args, "python -m serve")):
        with pytest.raises(SystemExit):
            parse(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: {module_form} ")


def test_usage_error_names_ftune_command_and_name_is_reset_after(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["sweep", "--no-such-flag"])
    assert done.value.code == 2
    assert "usage: ftune sweep " in capsys.readouterr().err
    assert prog("python -m tune") == "python -m tune"  # outside `ftune sweep` again
