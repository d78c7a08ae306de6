"""The one base class of the errors the project raises for bad user input.

It lives in the lowest layer so that the backbone, the data formats and the tasks can all derive their
errors from it; the ``mobilenets`` command turns any of them into one line on stderr and exit status 2
(``--debug`` or ``MOBILENETS_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations


class MobilenetsError(Exception):
    """A file, option or value the user gave that cannot be used; the message names the file, line or key
    and says what was expected. Library errors derive from it together with the builtin they refine
    (``ValueError``, ``FileNotFoundError``, ...), so existing ``except ValueError`` callers still work."""


class ConfigError(MobilenetsError, ValueError):
    """A config file or command-line option that cannot be used; the message names the file and key."""
