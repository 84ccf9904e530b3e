"""TensorFlow without its start-up noise: import this module first in every entry point, before anything that
imports TensorFlow (keras, the model client, the server).

Two kinds of noise, two remedies:
- TensorFlow's own C++ logs once its logging is set up (cpu_feature_guard, "failed call to cuInit" on a machine
  without a GPU, "Local rendezvous is aborting"): TF_CPP_MIN_LOG_LEVEL=3 keeps FATAL only. It is read when
  TensorFlow loads, hence "first". Real failures still reach the user: TensorFlow raises them as Python exceptions.
- Lines logged while TensorFlow's shared libraries load (the oneDNN notice, "Could not find cuda drivers",
  absl's "All log messages before absl::InitializeLog() is called are written to STDERR") come from absl before
  anything reads TF_CPP_MIN_LOG_LEVEL, and absl has no variable that stops them. So the first `import tensorflow`
  runs with the stderr file descriptor captured; afterwards every captured line goes back to stderr except absl's
  banner and the records (with their continuation lines) that TF_CPP_MIN_LOG_LEVEL would have dropped.

Importing this module costs nothing when the process never imports TensorFlow (the capture hooks that import).
TF_ENABLE_ONEDNN_OPTS is left alone: it changes numerics, and only its notice is noise. A TF_CPP_MIN_LOG_LEVEL of
your own is kept (and filters the start-up lines the same way); PRODUCTLENS_DEBUG=1 shows TensorFlow's logs as
they are.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

DEBUG_VARIABLE = "PRODUCTLENS_DEBUG"
# absl's and TensorFlow's C++ log prefix: severity letter, MMDD, time (before absl::InitializeLog, hh:mm:<epoch
# seconds>), thread id, file:line]
_LOG_RECORD = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]\s]+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL=n drops the first n of these
DEFAULT_MIN_LOG_LEVEL = "3"
# The second line of cpu_feature_guard's record; any other line ends a dropped record.
_CONTINUATIONS = ("To enable the following instructions",)


def debugging() -> bool:
    """Whether PRODUCTLENS_DEBUG asks for everything: TensorFlow's logs and Python tracebacks."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as a number (0 when unset or unreadable: TensorFlow's own default)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def without_start_up_noise(text: str, level: int) -> str:
    """`text` without absl's banner and the C++ log records below `level` (with their continuation lines)."""
    quiet = SEVERITIES[: max(0, level)]
    kept: list[str] = []
    dropping = False
    for line in text.splitlines(keepends=True):
        record = _LOG_RECORD.match(line)
        if record is not None:
            dropping = record.group(1) in quiet
        elif line.rstrip("\n") == _ABSL_BANNER:
            dropping = level > 0
        elif not (dropping and line.startswith(_CONTINUATIONS)):
            dropping = False
        if not dropping:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def stderr_filtered() -> Iterator[None]:
    """Capture file descriptor 2 for the block, then write back what without_start_up_noise keeps."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to capture (closed descriptor): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = without_start_up_noise(captured.read().decode("utf-8", errors="replace"), min_log_level())
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """The real loader of the `tensorflow` package, run under stderr_filtered; everything else delegated."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # resources and pkgutil see TensorFlow's own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with stderr_filtered():
            self._loader.exec_module(module)  # type: ignore[attr-defined]


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` the ordinary way and wraps its loader; removes itself after the first import."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Set TF_CPP_MIN_LOG_LEVEL and hook the first `import tensorflow` (idempotent; a no-op when debugging)."""
    if debugging():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_MIN_LOG_LEVEL)
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


install()
