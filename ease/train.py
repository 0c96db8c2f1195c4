"""``python -m ease.train --config run.toml``: one training run from a TOML file.

A shim: the command is :mod:`ease.cli.train` (also installed as ``ease-train``), whose
documentation describes the run file's tables and keys.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from ease.cli.train import main

    sys.exit(main())
