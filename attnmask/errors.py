"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class AttnmaskError(Exception):
    """A problem with the user's input (paths, stores, arguments), reported without a traceback."""
