"""What every otad command line shares: one-line errors and exit codes.

Exit 0 on success, 1 on any error the user can act on (bad input, failed
verification, usage), each reported as one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from otad.errors import OtadError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: error: {message}\n")


def run(prog: str, handler: Callable[[], int]) -> int:
    try:
        return handler()
    except OtadError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
