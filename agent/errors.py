"""Errors the command line reports as one line and exit status 2 (bad input, not a bug)."""


class InputError(Exception):
    """Bad input from the user: a missing or unreadable file, a bad capture, a wrong config value."""
