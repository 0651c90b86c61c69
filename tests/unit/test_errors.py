"""tuneline/errors.py: a TunelineError leaves a command as one line on stderr and exit status 1."""

import pytest

from tuneline.errors import TunelineError, exit_on_error


def test_a_tuneline_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    @exit_on_error
    def main() -> None:
        raise TunelineError("params.yaml: train.lora_r: must be positive")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: params.yaml: train.lora_r: must be positive\n"


def test_any_other_error_keeps_its_traceback() -> None:
    @exit_on_error
    def main() -> None:
        raise RuntimeError("a bug, not a bad input")

    with pytest.raises(RuntimeError, match="a bug"):
        main()
