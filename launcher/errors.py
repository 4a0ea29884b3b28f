"""Errors the launcher reports as one line and exit status 2, before anything is started."""


class UsageError(Exception):
    """Bad input: a flag, an override, a hostfile, a device count. The message names the fix."""

    exit_code = 2
