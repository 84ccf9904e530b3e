"""common.quiet_tf: TensorFlow loads without its start-up lines; errors and Python warnings still show."""

from __future__ import annotations

import os
import subprocess
import sys

from common.quiet_tf import without_start_up_noise
from tests.conftest import REPO_ROOT

# What TensorFlow 2.21 printed on stderr while loading, on a machine without a GPU (before this module).
START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796098152.374479   30015 port.cc:153] oneDNN custom operations are on. You may see slightly different \
numerical results due to floating-point round-off errors from different computation orders. To turn them off, set \
the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796098152.374857   30015 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not \
be used.
I0000 00:00:1796098152.461915   30015 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available \
CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate \
compiler flags.
"""
KEPT = """\
E0000 00:00:1796098290.839990    1756 some_loader.cc:52] a library that should load did not
/work/main/components/train.py:12: UserWarning: a Python warning raised while TensorFlow loads
"""


def test_the_start_up_lines_go_and_everything_else_stays() -> None:
    assert without_start_up_noise(START_UP + KEPT, level=2) == KEPT


def test_level_3_drops_errors_too_as_tensorflow_would() -> None:
    kept = without_start_up_noise(START_UP + KEPT, level=3)
    assert kept == KEPT.splitlines(keepends=True)[1]


def test_level_0_keeps_everything() -> None:
    assert without_start_up_noise(START_UP + KEPT, level=0) == START_UP + KEPT


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PRODUCTLENS_DEBUG")}
    environment.update(PYTHONPATH=str(REPO_ROOT), **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


def test_tensorflow_loads_and_runs_an_op_without_a_line_on_stderr() -> None:
    done = run_python("import common.quiet_tf\nimport keras, tensorflow as tf\nprint(float(tf.constant(1.0) + 1))")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2.0\n"
    assert done.stderr == ""


def test_debugging_leaves_tensorflow_alone() -> None:
    code = (
        "import os, sys\nimport common.quiet_tf\n"
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), any('Quiet' in type(f).__name__ for f in sys.meta_path))"
    )
    assert run_python(code).stdout == "3 True\n"
    assert run_python(code, PRODUCTLENS_DEBUG="1").stdout == "None False\n"
    assert run_python(code, TF_CPP_MIN_LOG_LEVEL="1").stdout == "1 True\n"  # a level of your own is kept
