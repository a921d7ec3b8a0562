"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class AnswersheetError(Exception):
    """A problem with a named input (object, file, key) that the user can act on."""


class ConfigError(AnswersheetError):
    """The roads file is invalid; the message names the road and the key."""
