"""The one project error type: a bad option, input or state, with the fix in the message."""


class RaydistillError(Exception):
    """Raised for anything the user can fix: bad config, unreadable input, missing run.

    The message always names the offending field, file or row and says what to do.
    """


class ConfigError(RaydistillError):
    """A config value is unknown or invalid; the message carries the dotted field path."""
