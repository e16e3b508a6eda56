"""The one exception the planner raises for mistakes a user can fix (bad YAML, unknown model)."""

from __future__ import annotations

from largebatch.errors import UserError


class PlanError(UserError, ValueError):
    """A user-fixable planner error; the command line prints it as one line and exits 2."""
