"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class VlmcError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def yaml_problem(e: Exception) -> str:
    """`invalid YAML at line 3, column 7 (expected ',' or ']')`: where the parser stopped, 1-based."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where} ({getattr(e, 'problem', None) or first_line(e)})"
