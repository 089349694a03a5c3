"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a wrong path, a corrupt model, a prompt that does not fit, a bad flag.

    The message is the whole report: what is wrong and what to do about it.
    """


class Cancelled(Exception):
    """Generation was stopped by the caller (Ctrl-C, or ``cancel()`` from another thread)."""
