"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class VlmcError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
