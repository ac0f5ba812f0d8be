"""The one base class for errors pgrelief reports to users as a single line.

Entry points catch ``PgreliefError`` and print its message (CLI exit 3) instead of a
traceback, so every module that rejects user input raises a subclass of it.
"""


class PgreliefError(Exception):
    """Base of every error pgrelief reports as one line (CLI exit 3)."""
