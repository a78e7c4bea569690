"""The one exception type a user can cause; the CLI prints it as a single line."""


class BesaError(Exception):
    """A problem with the user's input: the message names the setting and the fix."""


def at_least(setting: str, value, low) -> None:
    """`setting=value: must be at least low` unless value is None or large enough."""
    if value is not None and value < low:
        raise BesaError(f"{setting}={value}: must be at least {low}")


def positive(setting: str, value) -> None:
    if value is not None and not value > 0:
        raise BesaError(f"{setting}={value}: must be positive")
