"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class AttnmaskError(Exception):
    """A problem with the user's input (paths, stores, arguments), reported without a traceback."""


class UnreachableTau(AttnmaskError):
    """compile's tau exceeds what the row guarantee leaves prunable; `largest` is the largest reachable tau."""

    def __init__(self, message: str, largest: float):
        super().__init__(message)
        self.largest = largest
