"""Run one fuzz target under atheris (libFuzzer, coverage-guided):

    .venv/bin/python tests/fuzz/run.py TARGET [libFuzzer flags] [CORPUS_DIR ...]
    e.g. tests/fuzz/run.py sip_stack -runs=1000000 -max_len=4096 /tmp/corpus-sip tests/fuzz/seeds/sip

A crash prints the Python traceback and writes the input to crash-<sha1> (turn it into a unit test).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["gateway"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: run.py TARGET [libFuzzer flags] [corpus...]; targets: {', '.join(TARGETS)}")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
