"""One exception type for user mistakes, so entry points can print a single line and exit."""


class DanubeConfigError(ValueError):
    """Bad input from the user: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
