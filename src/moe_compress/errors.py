"""Error types shared by the whole package.

`UserError` means "the user asked for something that cannot be done": the CLI prints its message on one line
and exits with code 2, without a traceback. Anything else escaping to the CLI is an internal error.
"""


class UserError(Exception):
    """A user mistake (bad path, unsupported model, invalid budget, ...). The message is one line saying what is
    wrong and how to fix it."""
