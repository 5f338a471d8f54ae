"""%%name%%: a JSON echo over HTTP, built with componentize-py for the
standard wasi:http interface (the same component runs under `wasmtime serve`).

Any method and path: a body of JSON comes back as
{"method": ..., "path": ..., "echo": <the body>} with 200 ("echo": null for
no body); a body that is not JSON gets 400, one over 64 KiB gets 413, each
with {"error": ...}.
"""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import streams, types

MAX_BODY = 64 * 1024


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: types.IncomingRequest, response_out: types.ResponseOutparam) -> None:
        method = method_name(request.method())
        path = request.path_with_query() or ""
        try:
            body = read_body(request)
            if not body:
                status, reply = 200, {"method": method, "path": path, "echo": None}
            else:
                try:
                    echo = json.loads(body)
                    status, reply = 200, {"method": method, "path": path, "echo": echo}
                except ValueError as e:
                    status, reply = 400, {"error": f"body is not JSON: {e}"}
        except BodyError as e:
            status, reply = e.status, {"error": e.message}
        print(f"{method} {path} -> {status}")
        respond(response_out, status, json.dumps(reply, separators=(",", ":")).encode())


class BodyError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message


def method_name(method: types.Method) -> str:
    if isinstance(method, types.Method_Other):
        return method.value
    return type(method).__name__.removeprefix("Method_").upper()


def read_body(request: types.IncomingRequest) -> bytes:
    """The request's body; BodyError 413 past MAX_BODY, 400 if unreadable."""
    body = bytearray()
    incoming = request.consume()
    with incoming.stream() as stream:
        while True:
            try:
                chunk = stream.blocking_read(16 * 1024)
            except Err as e:
                if isinstance(e.value, streams.StreamError_Closed):
                    break
                raise BodyError(400, f"body not read: {e.value}")
            if len(body) + len(chunk) > MAX_BODY:
                raise BodyError(413, f"body over {MAX_BODY} bytes")
            body += chunk
    return bytes(body)


def respond(response_out: types.ResponseOutparam, status: int, body: bytes) -> None:
    response = types.OutgoingResponse(types.Fields.from_list([("content-type", b"application/json")]))
    response.set_status_code(status)
    outgoing = response.body()
    types.ResponseOutparam.set(response_out, Ok(response))
    with outgoing.write() as stream:
        # A blocking write takes at most 4096 bytes at a time.
        for start in range(0, len(body), 4096):
            stream.blocking_write_and_flush(body[start : start + 4096])
    types.OutgoingBody.finish(outgoing, None)
