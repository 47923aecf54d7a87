"""Starting phone sessions: the ``SessionManager`` of a backend that serves phones.

The manager itself (``xflwb.sessions.manager``) sits below the engines and runs whatever
module its caller names; this subclass is the caller for phones: it fills in the
workbench's bind address, TLS files and device enrollment, validates the options as a
``SessionConfig`` and runs the phone session's process (``PHONE_SESSION_MODULE``).
"""

from __future__ import annotations

from dataclasses import asdict
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
        options.setdefault("host", self.host)
        options.update(self.security)
        cfg = SessionConfig(**options)
        return self.start(model_name, asdict(cfg), PHONE_SESSION_MODULE, wait_ready)
