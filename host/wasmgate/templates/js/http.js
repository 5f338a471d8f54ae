// %%name%%: a JSON echo over HTTP, built with ComponentizeJS for the standard
// wasi:http interface (the fetch event of the web platform; the same
// component runs under `wasmtime serve`).
//
// Any method and path: a body of JSON comes back as
// {"method": ..., "path": ..., "echo": <the body>} with 200 ("echo": null for
// no body); a body that is not JSON gets 400, one over 64 KiB gets 413, each
// with {"error": ...}.

const MAX_BODY = 64 * 1024;

async function handle(request) {
  const url = new URL(request.url);
  const path = url.pathname + url.search;
  const body = await readBody(request);
  let status, reply;
  if (body === null) {
    [status, reply] = [413, { error: `body over ${MAX_BODY} bytes` }];
  } else if (body.length === 0) {
    [status, reply] = [200, { method: request.method, path, echo: null }];
  } else {
    try {
      const echo = JSON.parse(new TextDecoder().decode(body));
      [status, reply] = [200, { method: request.method, path, echo }];
    } catch (e) {
      [status, reply] = [400, { error: `body is not JSON: ${e.message}` }];
    }
  }
  console.log(`${request.method} ${path} -> ${status}`);
  return new Response(JSON.stringify(reply), {
    status,
    headers: { "content-type": "application/json" },
  });
}

// The body, or null past MAX_BODY (read no further than that).
async function readBody(request) {
  if (Number(request.headers.get("content-length") ?? 0) > MAX_BODY) return null;
  if (request.body === null) return new Uint8Array(0);
  const reader = request.body.getReader();
  const chunks = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    length += value.length;
    if (length > MAX_BODY) {
      await reader.cancel();
      return null;
    }
    chunks.push(value);
  }
  const body = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    body.set(chunk, offset);
    offset += chunk.length;
  }
  return body;
}

addEventListener("fetch", (event) => event.respondWith(handle(event.request)));
