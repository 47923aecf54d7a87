"""Starting phone sessions: the ``SessionManager`` of a backend that serves phones.

The manager itself (``xflwb.sessions.manager``) sits below the engines and runs whatever
module its caller names; this subclass is the caller for phones: it fills in the
workbench's bind address, TLS files and device enrollment, validates the options as a
``SessionConfig`` and runs the phone session's process (``PHONE_SESSION_MODULE``).
"""

from __future__ import annotations

from typing import Any

from xflwb.server.config import SessionConfig
from xflwb.sessions.handle import Session
from xflwb.sessions.manager import SessionManager
from xflwb.sessions.registry import Registry

#: the module a phone session's process runs (``python -m``)
PHONE_SESSION_MODULE = "xflwb.server.session_process"


class PhoneSessionManager(SessionManager):
    """A ``SessionManager`` that also starts phone sessions (``start_phone``)."""

    def __init__(self, registry: Registry, host: str = "127.0.0.1",
                 security: dict[str, Any] | None = None) -> None:
        super().__init__(registry)
        self.host = host
        #: the workbench's ``tls`` / ``device_auth``, given to every phone session it starts
        self.security = dict(security or {})

    def start_phone(self, model_name: str, wait_ready: float = 120.0,
                    **options: Any) -> Session:
        """Start a phone session of the latest ``model_name`` with ``SessionConfig``
        ``options`` (checked before any row is written)."""
        return self.start_config(model_name, phone_config(options, self.host, self.security),
                                 wait_ready)

    def start_config(self, model_name: str, cfg: SessionConfig,
                     wait_ready: float = 120.0) -> Session:
        """Start a phone session of the latest ``model_name`` with the validated ``cfg``
        (``phone_config``: the workbench's own bind address and security in it), stored
        as it is: no second validation."""
        return self.start(model_name, cfg, PHONE_SESSION_MODULE, wait_ready)


def phone_config(options: dict[str, Any], host: str,
                 security: dict[str, Any] | None = None) -> SessionConfig:
    """The ``SessionConfig`` of a phone session from a user's ``options``, with the
    backend's bind address (unless given) and its ``security`` (``tls``,
    ``device_auth``: the workbench's, never a session's): the one validation of a phone
    session's options on this side of the HTTP boundary."""
    return SessionConfig(**{"host": host, **options, **(security or {})})
