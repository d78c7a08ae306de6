"""``python -m mobilenets``: the ``mobilenets`` command.

``mobilenets`` is a namespace package assembled from backbone/, tasks/ and datasets/ (pyproject's package-dir);
this folder adds only this module to it, and has no ``__init__.py`` so that it never hides those pieces.
"""

import sys

from mobilenets.tasks.cli import console_main

sys.exit(console_main())
