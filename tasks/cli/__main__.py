"""``python -m mobilenets.tasks.cli``: the ``mobilenets`` command."""

import sys

from mobilenets.tasks.cli import console_main

sys.exit(console_main())
