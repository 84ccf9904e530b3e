"""How every ProductLens command ends: one line for an error the user can act on, a traceback only for a bug.

    if __name__ == "__main__":
        raise SystemExit(run_main(main, expected=(WeightsError,)))

Exit codes: what `main` returns; 1 for an expected error, printed as one line `error: <what>`; 2 for a usage error
(argparse's own); 130 after Ctrl-C. `--debug` anywhere on the command line (or PRODUCTLENS_DEBUG=1) re-raises
instead, so the traceback shows. Anything not expected is a bug and keeps its traceback.

Expected: EXPECTED_ERRORS (a missing or unreadable file, a params.yaml that does not fit), the types a command
passes (its refusals), and a ValueError that the project's own code raises: that one is a message written for the
user ("train.mobilenet_v2.alpha 0.6 is not one of ..."), while a ValueError from inside Keras or pandas is a bug in
how we called it and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.params import ParamsError
from common.quiet_tf import DEBUG_VARIABLE, debugging

DEBUG_FLAG = "--debug"
# Errors of the world, not of the code: a missing or unreadable input, a params.yaml that does not fit.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, ParamsError)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def raised_by_project(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is the project's own code (not an installed package)."""
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    path = Path(frame.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(PROJECT_ROOT) and not {".venv", "site-packages"} & set(path.parts)


def describe(error: BaseException) -> str:
    """The error as one line: an OSError's reason and path, or the exception's own message."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        reason = error.strerror[:1].lower() + error.strerror[1:]
        paths = [str(error.filename)] + ([str(error.filename2)] if error.filename2 is not None else [])
        return f"{reason}: {' -> '.join(paths)}"
    message = " ".join(str(error).split())  # one line, even for a message that wraps
    return message or type(error).__name__


def is_users_value_error(error: BaseException) -> bool:
    """A ValueError the project raised on purpose: its message is for the user (see the module docstring)."""
    return isinstance(error, ValueError) and raised_by_project(error)


def require_file(path: Path, what: str, remedy: str) -> Path:
    """`path` if it is a file; else FileNotFoundError "<what> not found: <path> (<remedy>)", which run_main prints."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({remedy})")
    return path


def without_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug` (before a `--`, after which arguments are positional), and whether it was there."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    kept = [arg for arg in args[:end] if arg != DEBUG_FLAG] + args[end:]
    return kept, len(kept) != len(args)


def run_main(
    main: Callable[[list[str]], int],
    argv: Sequence[str] | None = None,
    *,
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    """Run `main(argv)` (argv: sys.argv[1:] by default) and return its exit code, reporting `expected` errors
    (besides EXPECTED_ERRORS) as one line on stderr."""
    args, debug_flag = without_debug_flag(sys.argv[1:] if argv is None else argv)
    debug = debug_flag or debugging()
    try:
        return main(args)
    except Exception as error:
        if debug or not (isinstance(error, (*EXPECTED_ERRORS, *expected)) or is_users_value_error(error)):
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130


__all__ = [
    "DEBUG_FLAG",
    "DEBUG_VARIABLE",
    "EXPECTED_ERRORS",
    "describe",
    "is_users_value_error",
    "raised_by_project",
    "require_file",
    "run_main",
    "without_debug_flag",
]
