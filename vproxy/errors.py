"""Exceptions that cross module boundaries.

    VproxyError                 base of everything vproxy raises on purpose
     +-- UserError              a mistake the user can fix; the CLI prints one line, no traceback
     +-- ChannelRefused         the agent refused to open a channel (code, message)
     +-- StreamResetError       a stream was reset by either side (code, message)
     +-- SessionClosed          the session ended (reason)

Protocol violations live in vproxy.mux.errors: they are the sans-IO core's own.
"""


class VproxyError(Exception):
    """Base class of vproxy's own exceptions."""


class UserError(VproxyError):
    """Something the user asked for cannot be done; the message says why and what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "", exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


class ChannelRefused(VproxyError):
    """An open request was refused; code is a vproxy.mux.RefuseCode."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class StreamResetError(VproxyError):
    """The stream was reset; code is a vproxy.mux.ResetCode."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or "stream reset (code %d)" % code)
        self.code = code
        self.message = message


class SessionClosed(VproxyError):
    """The session is over; reason says why (GOAWAY message, dead peer, connection lost)."""

    def __init__(self, reason: str, code: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.code = code


# The name this exception had before 0.2, when it shared it with vproxy.mux's event:
# scripts that catch vproxy.errors.StreamReset keep working.
StreamReset = StreamResetError
