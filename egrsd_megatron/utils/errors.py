"""Errors shared by every layer. `ConfigError` lives here, at the bottom of the import graph, so that both
`config` (which validates) and `losses` (whose registry rejects an unknown `loss.name`) can raise it."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) and what to do."""
