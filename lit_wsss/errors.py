"""Errors whose message is the whole story, and how the command line shows them.

``lit-wsss fit ...`` builds the model and the data inside jsonargparse, which wraps an error raised there in
its own (with a dump of the whole parsed config), and Lightning adds its traceback. For an error of the user's
input (a weights file that is not one, a loss that went non-finite) the first line the user sees must name the
file or the step and say what was expected: :func:`report` finds a :class:`ReportedError` anywhere in the chain
of causes and prints only its message. ``LIT_WSSS_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys

#: set to 1 to see the full traceback of a :class:`ReportedError`
TRACEBACK_ENV = "LIT_WSSS_TRACEBACK"


class ReportedError(Exception):
    """An error whose message names what was wrong and what was expected; the CLI prints it without a traceback."""


class WeightsFileError(ReportedError, ValueError):
    """A weights file (``pretrained``, ``init_weights``, ``encoder_checkpoint``) that cannot be used."""


class MissingWeightsFileError(ReportedError, FileNotFoundError):
    """A weights file that does not exist."""


class TrainingDataError(ReportedError, ValueError):
    """Training data that cannot be what the user meant: an image without any class, a list shorter than a batch."""


class DataFileError(ReportedError, ValueError):
    """A data set file that is not what it must be: an empty split list, a label file with an unknown class or
    index, a malformed JSON or CSV, a mask of the wrong size or with values outside the classes."""


class MissingDataError(ReportedError, FileNotFoundError):
    """A data set root, split list, image, mask or label file that does not exist (the message names it)."""


class UnlabelledIdsError(ReportedError, KeyError):
    """Listed ids without an image-level label."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if self.args else ""


class ImageFileError(ReportedError, OSError):
    """An image file that is missing, empty, not an image, or truncated (``datamodules.files.read_rgb``)."""


class FolderInUseError(ReportedError, RuntimeError):
    """An output folder another live process is writing (``lit_wsss.io.acquire_folder_lock``)."""


class OutputFolderError(ReportedError, RuntimeError):
    """An output folder that holds results of other parameters, or a stage writing into it that failed."""


class NonFiniteError(ReportedError, FloatingPointError):
    """A training loss, or weights about to be saved, that hold nan or inf (``WSSSModule``)."""


def reported_cause(error: BaseException) -> ReportedError | None:
    """The first :class:`ReportedError` in ``error``'s chain of causes and contexts (``error`` itself first)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ReportedError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def own_message(error: BaseException) -> str:
    """The error's message without the worker traceback a DataLoader worker adds when it re-raises an error
    in the main process ("Caught X in DataLoader worker process 0. Original Traceback ...: <message>")."""
    message = str(error)
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
        message = last.removeprefix(prefix) + " (in a DataLoader worker)"
    return message


def report(error: BaseException, program: str = "lit-wsss") -> int | None:
    """Print ``<program>: error: <message>`` to stderr and return the exit code 1 when ``error`` stems from a
    :class:`ReportedError` (and ``LIT_WSSS_TRACEBACK`` is unset); ``None`` means: re-raise it."""
    cause = reported_cause(error)
    if cause is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return None
    print(f"{program}: error: {own_message(cause)}", file=sys.stderr)
    print(f"({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
    return 1
