"""The one exception type for mistakes a user can make (bad config, missing data, corrupt files).

Entry points catch `CnnlabError`, print its message as a single line and exit with its
`exit_code` (2; 3 for missing data); anything
else is a bug in cnnlab and keeps its traceback.
"""


class CnnlabError(Exception):
    """A user-facing error whose message is one line: what is wrong and how to fix it."""

    exit_code = 2  # of an entry point that stops on it


class ConfigError(CnnlabError):
    """The configuration asks for something impossible or unknown."""


class GeometryError(ConfigError):
    """A layer's window does not fit its input: the feature map would be empty."""

    def __init__(self, message: str, rows: list = ()):
        super().__init__(message)
        self.rows = list(rows)  # the per-layer table up to the failing layer, for display


class DataError(CnnlabError):
    """A dataset cannot be found, downloaded or decoded."""

    exit_code = 3  # apart from 2, so that `cnnlab-verify` can tell "no data here" from a failure


def check_choice(key: str, value, options) -> None:
    """Raise ConfigError unless `value` is one of `options` (a dict's keys or a sequence)."""
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not known; choose one of: {', '.join(options)}")
