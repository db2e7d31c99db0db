"""Regenerate the shell completion scripts in completions/ from the app (tests fail when they drift)."""

from __future__ import annotations

import sys
from pathlib import Path

from cifarnet_cli.cli import completion_scripts

ROOT = Path(__file__).resolve().parents[1] / "completions"


def main() -> int:
    ROOT.mkdir(exist_ok=True)
    for name, text in completion_scripts().items():
        (ROOT / name).write_text(text)
        print(f"wrote {ROOT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
