"""``python -m rapido``: serve | bench."""

from __future__ import annotations

import sys

from rapido.cli import main

if __name__ == "__main__":
    sys.exit(main())
