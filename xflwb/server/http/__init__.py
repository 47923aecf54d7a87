"""The HTTP API in small modules: one ``APIRouter`` per resource (``routes_*``), the shared
input checks (``inputs``), the app's state (``state``), the body limit (``limits``), the JSON
nesting bound (``json_depth``), deadlines on slow clients (``timeouts``), auth (``auth``)
and error handlers (``errors``). ``xflwb.server.app.create_app`` assembles them.

Nothing here runs SQL: routes ask the registry, the session manager and the token store.
"""
