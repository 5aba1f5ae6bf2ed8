"""The errors a bgit command reports as one line and a non-zero exit, rather than a traceback."""


class UserError(Exception):
    """A problem the user can fix, described in one line: what is wrong, where, and what to do."""
