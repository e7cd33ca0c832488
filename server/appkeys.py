"""The typed keys of what the application holds, shared by ``app.py`` and the routes.

``app.py`` fills them (long-lived resources in one ``cleanup_ctx``); route
handlers read them with ``request.config_dict[KEY]``.
"""

from __future__ import annotations

from aiohttp import web

from .auth import Auth
from .config import Settings
from .limits import OrgLimits
from .memory import HeapTrim
from .metrics import Metrics
from .pacer import Slots
from .providers import ProviderRegistry
from .registry import FlightRegistry
from .store import Store
from .turns import TurnService

__all__ = ["AUTH", "CLOSE_AFTER", "HEAP_TRIM", "LIMITS", "METRICS", "PACER", "PROVIDERS", "REGISTRY", "SETTINGS",
           "STORE", "TURNS"]

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
PACER = web.AppKey("pacer", Slots)
PROVIDERS = web.AppKey("providers", ProviderRegistry)
REGISTRY = web.AppKey("registry", FlightRegistry)
TURNS = web.AppKey("turns", TurnService)
AUTH = web.AppKey("auth", Auth)
LIMITS = web.AppKey("limits", OrgLimits)
HEAP_TRIM = web.AppKey("heap_trim", HeapTrim)

#: set on a request whose connection must close after its answer (its body was broken)
CLOSE_AFTER = web.RequestKey("close_after", bool)
