"""Tests use the pass registry as the driver does: importing the `passes` package registers every pass."""

import passes  # noqa: F401
