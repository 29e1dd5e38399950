"""The one exception type that the command line turns into a one-line message and exit code 2."""


class DoriError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""
