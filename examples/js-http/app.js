// An HTTP API in JavaScript, built with jco (ComponentizeJS, StarlingMonkey)
// for the standard wasi:http/incoming-handler: the same component runs under
// `wasmtime serve`.
//
//   GET  /hello?name=NAME -> 200 {"hello": NAME}
//   POST /readings        -> 201 with the JSON reading echoed back and
//                            stamped, 400 when the body is not a reading
//   GET  /upstream        -> fetch() to another server: this component has no
//                            allow.http grant, so the host denies the call and
//                            the handler answers 502 with the error
//   anything else         -> 404

async function handle(request) {
  const url = new URL(request.url);
  if (request.method === "GET" && url.pathname === "/hello") {
    return json(200, { hello: url.searchParams.get("name") ?? "world" });
  }
  if (request.method === "POST" && url.pathname === "/readings") {
    let reading;
    try {
      reading = await request.json();
    } catch (e) {
      return json(400, { error: `body is not JSON: ${e.message}` });
    }
    if (typeof reading?.celsius !== "number") {
      return json(400, { error: "a reading needs a numeric celsius field" });
    }
    return json(201, { ...reading, received_at: new Date().toISOString() });
  }
  if (request.method === "GET" && url.pathname === "/upstream") {
    try {
      const upstream = await fetch("http://127.0.0.1:9/");
      return json(200, { upstream_status: upstream.status });
    } catch (e) {
      return json(502, { error: `upstream call failed: ${e.message}` });
    }
  }
  return json(404, { error: `no route for ${request.method} ${url.pathname}` });
}

function json(status, body) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

addEventListener("fetch", (event) => event.respondWith(handle(event.request)));
