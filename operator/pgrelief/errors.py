"""The errors pgrelief reports to a user instead of a traceback.

Every entry point (CLI, standalone loop, operator) catches ``PgreliefError`` and shows its
message as one line: the message is written for the person at the terminal, names what was
tried (a DSN without its password, a file path) and never carries a secret.
"""

from __future__ import annotations


class PgreliefError(Exception):
    """A failure the user can act on; ``str(error)`` is one line, safe to print and log."""


class ConnectFailed(PgreliefError):  # noqa: N818 - the name other modules import
    """The server could not be reached or refused us for a reason other than full slots.

    Unreachable host or port, a bad password, an unknown role or database, a timeout.
    ``target`` is the connection string with the password removed.
    """

    def __init__(self, target: str, reason: str) -> None:
        self.target = target
        self.reason = reason
        super().__init__(f"cannot connect to {target}: {reason}")


class ServerRefused(PgreliefError):  # noqa: N818 - the name other modules import
    """The server answered but has no slot for us (SQLSTATE 53300, too_many_connections).

    This is not a tool failure: it is the incident itself ("sorry, too many clients already",
    slots reserved for superusers or ``pg_use_reserved_connections``, a role or database
    connection limit). ``server_message`` is PostgreSQL's own text so callers can report it.
    """

    def __init__(self, target: str, server_message: str, sqlstate: str = "53300") -> None:
        self.target = target
        self.server_message = server_message
        self.sqlstate = sqlstate
        super().__init__(f"server at {target} refused the connection: {server_message}")

    @property
    def reserved_slots_only(self) -> bool:
        """True when only reserved slots were left: a privileged role could still get in."""
        return "reserved for" in self.server_message


class DumpError(PgreliefError):
    """An activity or settings file that cannot be read as a pg_stat_activity / pg_settings dump."""
