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

    def __init__(self, message: str, rows: list = (), sized: bool = True):
        super().__init__(message)
        self.rows = list(rows)  # the per-layer table up to the failing layer, for display
        self.sized = sized  # a map too small (another size may fit), not a layer out of place


class DataError(CnnlabError):
    """A dataset cannot be found, downloaded or decoded."""

    exit_code = 3  # apart from 2, so that `cnnlab-verify` can tell "no data here" from a failure


def closest(word, options) -> str:
    """ "; did you mean X?" for the option nearest to a typo, or ""."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"; did you mean {close[0]}?" if close else ""


def check_choice(key: str, value, options) -> None:
    """Raise ConfigError, naming the closest, unless `value` is one of `options` (a dict's keys,
    a sequence or an enum)."""
    if value not in [str(o) for o in options]:
        valid = ", ".join(str(o) for o in options)
        raise ConfigError(
            f"{key}={value!r} is not known{closest(value, options)} (choose one of: {valid})"
        )


def choose(key: str, value, names):
    """`value` as a member of the enum `names`, or the ConfigError of `check_choice`."""
    check_choice(key, value, names)
    return names(value)
