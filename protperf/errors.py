"""protperf's error types: what the library raises when the input, not protperf, is at fault.

Library code raises :class:`InputError` (a ``ValueError``, so callers may catch either) with a
message that names the file, record or setting at fault and says how to fix it; the command line
(:mod:`protperf.commandline`) prints that message as one line and exits with status 1. Anything
else that escapes a verb is a bug in protperf and keeps its traceback.
"""

from __future__ import annotations


class ProtperfError(Exception):
    """Base of the errors protperf raises on purpose."""


class InputError(ProtperfError, ValueError):
    """Bad input (a file, a record, an option's value, a model) with a message that says what is
    wrong and where."""
