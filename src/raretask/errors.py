"""The one exception type for mistakes a user can make (bad config, bad data, infeasible request).

The CLI turns it into one line on stderr and exit code 2; everything else is a bug and keeps its
traceback. Messages name the field, file or line so the user can fix it without reading code.
"""


class UserError(ValueError):
    """A mistake in what the user asked for; ``str(err)`` is the whole one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, always
