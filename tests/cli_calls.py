"""How tests call the CLI in-process: one place for the exit-code and one-line-error checks."""

import pytest

from raretask.cli import main


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of ``raretask ARGS``."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def fails(argv: list[str], capsys) -> str:
    """The one ``error: ...`` line of a refused call (exit 2, nothing on stdout)."""
    capsys.readouterr()
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
