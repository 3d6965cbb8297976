"""The one exception type the CLI prints as a single line.

Every error that is the user's to fix (a missing file, a bad value, a dataset that lacks a stage, a
checkpoint of the wrong kind) derives from :class:`UserError`. ``pathvl`` prints those as
``pathvl COMMAND: error: MESSAGE`` and exits 2; anything else is a bug and shows its traceback.
Most subclasses also derive from ``ValueError`` so library callers can catch them as such.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error the user can fix from its message alone (named file, value and what to do)."""
