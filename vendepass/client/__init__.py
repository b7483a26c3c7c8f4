"""
The VendePass client: a Twisted client library (L{vendepass.client.protocol})
and the terminal app customers use (C{vendepass-client}).
"""

from vendepass.client.protocol import (
    DEFAULT_ENDPOINT,
    ConnectionLost,
    ServerError,
    VendePassClientProtocol,
    connect,
)

__all__ = ["DEFAULT_ENDPOINT", "ConnectionLost", "ServerError", "VendePassClientProtocol", "connect"]
