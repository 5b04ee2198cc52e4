"""Schemathesis hooks for tests/openapi.rs: how to put an NDJSON body on the wire.

Bulk registration (POST /api/v1/things/bulk) reads one JSON object per line. The document
describes that body as a string; a generated string goes as it is, anything else as one JSON
document per line.
"""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\n" for item in items).encode()
