"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class HeadstartError(Exception):
    """Base class: the message alone tells the user what went wrong and what to do."""


class DataError(HeadstartError):
    """Missing path, no examples, one class only, unreadable table."""


class UnknownBaseError(HeadstartError):
    """The base name is neither registered, a local model folder, a timm name nor a reachable hub id."""


class UnknownMethodError(HeadstartError):
    """The method name is not registered."""


class BundleError(HeadstartError):
    """A bundle is missing, incomplete, or its base does not match."""


class LabelError(HeadstartError):
    """Evaluation data holds labels the specialist never saw."""


class ConfigError(HeadstartError):
    """A method option has an invalid value."""


class TrainingError(HeadstartError):
    """A checkpoint cannot be resumed (another run's, or damaged)."""
