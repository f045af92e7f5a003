"""Errors of the data pipeline; each message names the file or URL (and record) at fault."""

from __future__ import annotations

from protperf.errors import InputError


class DataError(InputError):
    """Anything in the data that stops ``prepare-data`` or a verb reading a dataset; the command
    line prints the message as one line and exits with status 1."""


class DownloadError(DataError):
    """A URL could not be fetched (404, too many dropped connections, a release that does not exist)."""


class ChecksumError(DataError):
    """Downloaded bytes do not match the size or md5 that RELEASE.metalink announces."""


class FormatError(DataError):
    """Input that is not what it claims to be: truncated gzip, a record without sequence, not FASTA."""
