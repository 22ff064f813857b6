"""Errors that carry a message a user can act on."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field and what to change."""


class CapacityError(ConfigError):
    """The model (or a request) cannot fit the hardware in any tier."""
