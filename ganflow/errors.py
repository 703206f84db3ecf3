"""User-facing errors: each carries one readable line; the CLI prints it and exits non-zero."""


class GanflowError(Exception):
    """An error caused by the user's input or environment, not a bug in ganflow."""

    exit_code = 1


class ConfigError(GanflowError):
    """A params file that cannot be used: ``params.yaml: train.lr_g: must be > 0``."""

    exit_code = 2


class DataError(GanflowError):
    """A data source that cannot be prepared or loaded."""


class TrainingError(GanflowError):
    """Training could not run or did not finish."""


class TrackingError(GanflowError):
    """The tracking store cannot be used."""


class TuneError(GanflowError):
    """The sweep cannot run."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
