"""The error type of bad input (a config, the data, weight files): its message names the problem
and the fix (a config key, an option, an environment variable). train_net.py and its `--check`
print such an error as one message, without a traceback; anything else is a bug and keeps its
traceback."""


class InputError(Exception):
    """Mixed into the project's errors about user input (with the built-in type they are)."""


class ConfigError(InputError, ValueError):
    """A config value that cannot work (with the override that fixes it)."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the config or the options name is not there."""
