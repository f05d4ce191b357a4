"""Logging for every entry point: console + a log file in the run folder, rank 0 only under DDP."""
import logging
import sys

LOGGER_NAME = "mambatalk"


def get_logger():
    return logging.getLogger(LOGGER_NAME)


class LogFile(logging.FileHandler):
    """The run's log file. A failed write (a full disk) is reported once and the file is dropped, where logging would
    print a traceback for every later line; the console keeps logging."""

    def handleError(self, record):
        err = sys.exc_info()[1]
        get_logger().removeHandler(self)  # the last handler: the console has already shown this record
        self.close()
        print(f"warning: cannot write the log file {self.baseFilename} ({getattr(err, 'strerror', None) or err}); "
              "logging to the console only", file=sys.stderr)


def setup_logging(log_file=None, rank=0, level=logging.INFO):
    """Attach console (and optional file) handlers to the project logger. Other ranks only log warnings."""
    logger = get_logger()
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        file_handler = LogFile(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def run_cli(main):
    """Run an entry point; input problems (missing files, bad shapes, mismatched checkpoints) end with a one-line
    message and exit status 2 instead of a traceback. Set MAMBATALK_DEBUG=1 for the traceback."""
    import os
    from utils.checkpoint import CheckpointMismatchError
    try:
        return main()
    except (FileNotFoundError, ValueError, CheckpointMismatchError, FloatingPointError, OSError) as err:
        if os.environ.get("MAMBATALK_DEBUG"):
            raise
        logger = get_logger()
        if logger.handlers:  # console (stderr) and the run's log file: printing it as well would show it twice
            logger.error(f"error: {err}")
        else:
            print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
