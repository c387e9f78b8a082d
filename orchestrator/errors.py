"""Errors that come from what the user gave (config, data, URIs): one clear line, exit code 2."""


class UserError(Exception):
    """Bad input named in one line; the CLI prints ``prunetune: error: <message>`` and exits 2."""


class ConfigError(UserError):
    """A config file, field, override or search space that is missing or malformed."""


class DataError(UserError):
    """A dataset folder that is missing, empty or not in ImageNet layout."""


class TrackingError(UserError):
    """A tracking server that cannot be reached, or an experiment that does not exist."""
