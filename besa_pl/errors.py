"""The one exception type a user can cause; the CLI prints it as a single line."""


class BesaError(Exception):
    """A problem with the user's input: the message names the setting and the fix."""
