"""The project's logging, set up as detectron2 sets up its own (`default_setup`).

- the ``distillation`` logger (every module of this package logs under it): the console on the
  main process, ``OUTPUT_DIR/log.txt`` (``log.txt.rankN`` on the others), through detectron2's
  `setup_logger`;
- Python warnings into the same console and files (``py.warnings``, `logging.captureWarnings`):
  formatted, timed and kept in log.txt instead of going bare to stderr;
- no ANSI escape codes in anything but a terminal: detectron2 colours its console lines and
  highlights the config it logs (pygments), in log.txt as well, and a console redirected to a
  file keeps them too; those outputs get the text without them (detectron2's loggers are set
  up here, before its default_setup logs anything).

Lines logged before the files exist (train_net's input checks run before any process starts)
are held (`held_logs`) and logged once the logs are set up.
"""
import contextlib
import logging
import re
from typing import List, Optional

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PROJECT_LOGGER = "distillation"
WARNINGS_LOGGER = "py.warnings"
# the loggers a train_net process writes: detectron2's default_setup sets up the first two
LOGGERS = ("detectron2", "fvcore", PROJECT_LOGGER, WARNINGS_LOGGER)


class PlainTextFormatter(logging.Formatter):
    """Another formatter's text without ANSI escape codes."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record):
        return ANSI_ESCAPE.sub("", self.inner.format(record))


class _NoTrailingNewline(logging.Filter):
    """A captured warning's text (warnings.formatwarning) without its closing newline, which
    would leave a blank line after each."""

    def filter(self, record):
        record.msg, record.args = record.getMessage().rstrip(), None
        return True


def _is_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def plain_text_off_terminals(names=LOGGERS) -> None:
    """Strip ANSI escape codes from what the loggers `names` write anywhere but a terminal."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            formatter = handler.formatter or logging.Formatter()
            if not _is_terminal(handler) and not isinstance(formatter, PlainTextFormatter):
                handler.setFormatter(PlainTextFormatter(formatter))


def setup_logs(output_dir: Optional[str] = None, rank: int = 0,
               capture_warnings: bool = True) -> logging.Logger:
    """detectron2's, fvcore's and the ``distillation`` logger on the console (rank 0) and in
    `output_dir`/log.txt (every rank; none without `output_dir`), with `capture_warnings`
    Python warnings too; no escape codes off terminals. Call it before detectron2's
    default_setup, which logs the config highlighted. Returns the ``distillation`` logger."""
    from detectron2.utils.logger import setup_logger

    # default_setup's own two calls, argument for argument: setup_logger caches its calls, so
    # default_setup's then add no second set of handlers, and its lines find these plain ones
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    logger = setup_logger(output_dir, distributed_rank=rank, name=PROJECT_LOGGER)
    if capture_warnings:
        warnings_logger = setup_logger(output_dir, distributed_rank=rank, name=WARNINGS_LOGGER,
                                       abbrev_name="warnings")
        if not any(isinstance(f, _NoTrailingNewline) for f in warnings_logger.filters):
            warnings_logger.addFilter(_NoTrailingNewline())
        logging.captureWarnings(True)
    plain_text_off_terminals()
    return logger


class _Holder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        # formatted now and stripped of its arguments: the record crosses process boundaries
        record.msg, record.args, record.exc_info, record.exc_text = (record.getMessage(), None,
                                                                     None, None)
        self.records.append(record)


@contextlib.contextmanager
def held_logs(name: str = PROJECT_LOGGER):
    """Hold what logger `name` (and its children) log inside the block, at every level, instead
    of writing it; yields the holder, whose `.records` go to `replay` once the logs are set up.
    If the block raises, the held lines are written to the console first (they may explain)."""
    logger = logging.getLogger(name)
    holder = _Holder()
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers, logger.propagate = [holder], False
    logger.setLevel(logging.DEBUG)
    try:
        yield holder
    except BaseException:
        _restore(logger, saved)
        if holder.records:  # through the handlers there are, else on a console of their own
            replay(holder.records, logger if logger.handlers
                   else setup_logs(capture_warnings=False))
        raise
    _restore(logger, saved)


def _restore(logger: logging.Logger, saved) -> None:
    logger.handlers, logger.propagate = saved[0], saved[2]
    logger.setLevel(saved[1])  # (setLevel, not the attribute: it clears the level caches)


def replay(records, logger: Optional[logging.Logger] = None) -> None:
    """Write held records through `logger`'s handlers (default: the project's logger)."""
    logger = logger or logging.getLogger(PROJECT_LOGGER)
    for record in records:
        logger.handle(record)
