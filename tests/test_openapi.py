"""The live ``/openapi.json`` documents what the admin API answers (issue 13 item 5): every
admin route's success response is a schema with named properties, and every route carries
the one tag of its resource's router. Real uvicorn on loopback."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import xflwb

pytestmark = pytest.mark.timeout(120)
AUTH = {"Authorization": "Bearer secret"}
ADMIN = "/api/v1"

#: path prefix → the tag of the router that serves it (the longest prefix wins)
TAGS = {
    f"{ADMIN}/models": "models",
    f"{ADMIN}/sessions": "sessions",
    f"{ADMIN}/devices": "devices",
    f"{ADMIN}/devices/tokens": "tokens",
    f"{ADMIN}/telemetry": "devices",
    "/train/": "fedkit",
    "/telemetry/": "fedkit",
    "/static/": "static",
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    wb = xflwb.Workbench(data_dir=tmp_path_factory.mktemp("openapi") / "xfl", port=0,
                         admin_token="secret").start()
    try:
        yield wb, httpx.get(f"{wb.url}/openapi.json", timeout=30).json()
    finally:
        wb.stop()


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a ``$ref`` followed, and an array's items in its place."""
    if schema.get("type") == "array":
        schema = schema["items"]
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _admin_operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in spec["paths"].items()
            if path.startswith(ADMIN + "/") for method, op in ops.items()]


def test_every_admin_route_documents_the_fields_it_answers(live) -> None:
    _wb, spec = live
    ops = _admin_operations(spec)
    assert len(ops) >= 14
    untyped = []
    for path, method, op in ops:
        codes = [c for c in op["responses"] if c.startswith("2")]
        assert len(codes) == 1, (method, path, codes)
        schema = op["responses"][codes[0]]["content"]["application/json"]["schema"]
        fields = _resolve(schema, spec).get("properties", {})
        if not fields or any(not ({"type", "$ref", "anyOf"} & set(f)) for f in fields.values()):
            untyped.append(f"{method.upper()} {path}: {schema}")
    assert untyped == [], "\n".join(untyped)


def test_each_resource_routes_carry_the_one_tag_of_its_router(live) -> None:
    _wb, spec = live
    wrong, seen = [], set()
    for path, ops in spec["paths"].items():
        prefix = max((p for p in TAGS if path.startswith(p)), key=len, default=None)
        for method, op in ops.items():
            seen.add(op.get("tags", [None])[0])
            if prefix is None or op.get("tags") != [TAGS[prefix]]:
                wrong.append(f"{method.upper()} {path}: {op.get('tags')}")
    assert wrong == [], "\n".join(wrong)
    assert seen == set(TAGS.values())  # every router serves at least one route


def test_answers_hold_exactly_the_documented_fields(live) -> None:
    """The schema names what a route really answers (the token routes as a sample)."""
    wb, spec = live
    schemas = spec["components"]["schemas"]
    issued = httpx.post(f"{wb.url}{ADMIN}/devices/tokens", json={"device": "pixel"},
                        headers=AUTH, timeout=30)
    assert issued.status_code == 201, issued.text
    assert set(issued.json()) == set(schemas["IssuedTokenOut"]["properties"])
    listed = httpx.get(f"{wb.url}{ADMIN}/devices/tokens", headers=AUTH, timeout=30).json()
    assert [set(t) for t in listed] == [set(schemas["TokenOut"]["properties"])]
    revoked = httpx.delete(f"{wb.url}{ADMIN}/devices/tokens/{issued.json()['id']}",
                           headers=AUTH, timeout=30).json()
    assert revoked == {"id": issued.json()["id"], "revoked": True}
    assert set(revoked) == set(schemas["RevokedOut"]["properties"])
