"""The project's errors (layer 0): one base class for every failure a user can act on.

Command-line entry points turn a :class:`SimsError` into one line ``PROG: error: ...`` and exit
status 2; any other exception is a bug and shows its traceback. Each subclass also derives from
the built-in exception it refines (``ValueError``, ``FileNotFoundError``, ...), so callers that
catch the built-in keep working.
"""
from __future__ import annotations

import pickle


class SimsError(Exception):
    """Base class: an error whose one-line message tells the user what to change."""


class InputError(SimsError, ValueError):
    """A bad value: a config key, an argument, a data set, a weights file."""


class ConfigError(InputError):
    """A configuration file or override the user must fix (the message names the key)."""


class DatasetError(InputError):
    """A data set the user must fix: missing path, wrong image size, unreadable file, bad labels."""


class WeightsError(InputError):
    """Exported weights missing, unreadable, or not matching what the caller needs."""


class LoopError(InputError):
    """A loop configuration or run-directory problem the user must fix."""


class WorkflowError(LoopError):
    """A workflow request the user must fix (unknown name, too little real data, bad sizes)."""


class ConfigMismatchError(LoopError):
    """The run directory was created by a different configuration."""


class MissingFileError(InputError, FileNotFoundError):
    """A file the user named (weights, reference statistics, data) does not exist."""


class OutputExistsError(InputError, FileExistsError):
    """The output path exists and overwriting was not asked for (or is refused)."""


class MissingDependencyError(SimsError, ImportError):
    """An optional dependency (the ``fid`` extra: torchvision, torch-fidelity) cannot be imported."""


class TrainingDivergedError(SimsError, FloatingPointError):
    """The training loss became NaN or infinite."""


class RunDirLockedError(SimsError):
    """Another job is working in the run directory (the message names its pid and host)."""


class PreemptedError(SimsError):
    """The job received SIGTERM/SIGUSR1, saved a checkpoint and stopped; re-run the command to resume."""


class IncompleteStageError(SimsError):
    """A stage stopped before its end (e.g. training short of its step count); re-run to resume."""


class UnsafePickleError(SimsError, pickle.UnpicklingError):
    """A pickle asks for something the safe EDM loader does not allow; nothing it asked for ran."""
