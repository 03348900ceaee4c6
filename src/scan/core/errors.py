"""The errors a user can cause: each message is ONE line naming the file or option and what was
expected, and the command line prints it without a traceback (scan.cli).

- ConfigError: a setting or command-line option is wrong (a misspelt key, an unknown name, a value
  out of range), found before any work starts;
- RunError: a trained run is used wrongly (not a run directory, a bad cluster name, images of
  another shape);
- StageError: a stage cannot go on (its inputs are missing, the loss became NaN);
- ArtifactError: a file of a run cannot be written or read back.

They live at the bottom of the package so that every layer can raise them.
"""
from __future__ import annotations

import shlex


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key."""


class RunError(ValueError):
    """A user mistake with a trained run (not a run directory, bad cluster name, wrong image shape)."""


class StageError(RuntimeError):
    """A stage cannot go on (missing inputs, NaN loss, ...); the message says what to do."""


class ArtifactError(RuntimeError):
    """A file of a run cannot be written or read back; str(e) is one line naming it and what to do."""


def typed(path) -> str:
    """`path` as it must be typed in a command a message suggests: quoted for the shell when it holds spaces
    or shell characters (a folder "My Photos" gives a run directory "runs/My Photos-..."), else as it is."""
    return shlex.quote(str(path))
