"""``python -m edgespec`` is the ``edgespec`` command."""

from edgespec.cli import app

app(prog_name="edgespec")
