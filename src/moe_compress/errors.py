"""Error types shared by the whole package.

`UserError` means "the user asked for something that cannot be done": the CLI prints its message on one line
and exits with code 2, without a traceback. Anything else escaping to the CLI is an internal error.
"""


class UserError(Exception):
    """A user mistake (bad path, unsupported model, invalid budget, ...). The message is one line saying what is
    wrong and how to fix it."""


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device" / "disk quota exceeded", whether raised by Python (`OSError` with
    ``ENOSPC``/``EDQUOT``) or reported as text by a native writer (safetensors' Rust writer raises a
    `SafetensorError` whose message holds the OS error)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text
