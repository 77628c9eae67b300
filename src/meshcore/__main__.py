"""``python -m meshcore``: the CLI."""

import sys

from .cli import main

sys.exit(main())
