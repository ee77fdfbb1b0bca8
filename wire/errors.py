"""The wire package's one error, and how a pydantic refusal is put in one line."""

from __future__ import annotations

from pydantic import ValidationError


class FilterError(ValueError):
    """A filter that cannot be read: over a limit, a bad field name, a value of the wrong type,
    text that is not ``FIELD=VALUE``. The filter came from the user; the message says which
    part is wrong. (A ValueError, so that pydantic validators may raise it; the indexer's
    ``indexer.errors.FilterError`` is a subclass, which is what the server raises.)"""


def first_problem(error: ValidationError) -> str:
    """The first thing pydantic found wrong, with where (``year.gte: ...``) and how many more:
    the message of an error raised for a document that does not validate."""
    problems = error.errors()
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"] if part != "root")
    message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"
