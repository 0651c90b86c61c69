"""One-line errors: every bad input is answered with the file, key or row and what to do."""

import functools
import sys
from collections.abc import Callable


class TunelineError(Exception):
    """An error the user can fix; its message is the whole story, printed on one line."""


def exit_on_error(main: Callable[..., None]) -> Callable[..., None]:
    """Run a stage's main() so that a TunelineError prints one line and exits 1, with no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> None:
        try:
            main(*args, **kwargs)
        except TunelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    return wrapper
