"""The one error type the CLI turns into a one-line message and a non-zero exit, and `printable`, which keeps
names from the outside (zip members, object keys) from breaking that one line or driving the terminal."""


class AnswersheetError(Exception):
    """A problem with a named input (object, file, key) that the user can act on."""


class ConfigError(AnswersheetError):
    """The roads file is invalid; the message names the road and the key."""


def _escape(ch: str) -> str:
    return repr(ch)[1:-1]  # '\n' -> \n, ESC -> \x1b, U+202E -> \u202e


def printable(text: str) -> str:
    """`text` with every non-printable character (str.isprintable: controls incl. newline, CR, ESC, DEL and C1,
    Unicode format/separator characters such as U+202E or U+2028) escaped repr-style, so that it stays one line
    and cannot move the cursor or recolour a terminal. Printable text, backslashes included, is returned as is,
    which makes it idempotent: every layer (rejection records, log lines, the CLI's error line) may apply it."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
