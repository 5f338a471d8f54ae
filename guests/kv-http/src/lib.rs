//! `kv-http`: key-value operations over HTTP, for trying buckets out and for
//! the tests. Built with plain `wit-bindgen` against the standard WIT
//! (`wasi:http/proxy`, `wasi:keyvalue@0.2.0-draft`): nothing of wasmgate's.
//!
//! `GET /OP/BUCKET/KEY?n=N&v=TEXT&bytes=N`:
//!
//! | OP     | does                                                          |
//! |--------|---------------------------------------------------------------|
//! | `open` | opens BUCKET                                                  |
//! | `incr` | increments KEY by `n` (1), answers the new value              |
//! | `get`  | answers KEY's value (404 without one)                         |
//! | `set`  | sets KEY to `v`, or to `bytes` bytes of `x`                   |
//! | `del`  | deletes KEY                                                   |
//! | `fill` | sets KEY0 … KEY(n-1), one byte each, stopping at an error     |
//! | `ops`  | calls `exists` `n` times, stopping at an error                |
//! | `gets` | gets KEY0 … KEY(n-1), one call each                           |
//! | `incrs`| increments KEY by 1, `n` times                                |
//! | `list` | lists every key, page by page: `keys=K pages=P`               |
//! | `many` | `get-many` of KEY0 … KEY(n-1): `found=F`                      |
//! | `setmany` | `set-many` of KEY0 … KEY(n-1), each `bytes` bytes of `x`   |
//!
//! An error answers 500 (403 for `access-denied`) with the error in the body.

wit_bindgen::generate!({
    inline: r#"
        package example:kv-http;

        world kv-http {
            include wasi:http/proxy@0.2.12;
            include wasi:keyvalue/imports@0.2.0-draft;
        }
    "#,
    path: "../../wit",
    world: "example:kv-http/kv-http",
    generate_all,
});

use exports::wasi::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::keyvalue::store::{self, Bucket, Error};
use wasi::keyvalue::{atomics, batch};

struct KvHttp;

impl Guest for KvHttp {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_default();
        let (status, body) = match run(&target) {
            Ok(text) => (200, text),
            Err((status, text)) => (status, text),
        };
        respond(response_out, status, &body);
    }
}

type Answer = Result<String, (u16, String)>;

fn fail(e: Error) -> (u16, String) {
    match e {
        Error::AccessDenied => (403, "access-denied".into()),
        Error::NoSuchStore => (404, "no-such-store".into()),
        Error::Other(why) => (500, format!("error: {why}")),
    }
}

fn run(target: &str) -> Answer {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let n: u64 = param("n").and_then(|n| n.parse().ok()).unwrap_or(1);
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let op = parts.next().unwrap_or_default();
    let bucket_name = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let bucket = store::open(bucket_name).map_err(fail)?;
    match op {
        "open" => Ok("opened".into()),
        "incr" => atomics::increment(&bucket, key, n)
            .map(|v| v.to_string())
            .map_err(fail),
        "get" => match bucket.get(key).map_err(fail)? {
            Some(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
            None => Err((404, format!("no key {key:?}"))),
        },
        "set" => {
            let value = match param("bytes") {
                Some(b) => vec![b'x'; b.parse().unwrap_or(0)],
                None => param("v").unwrap_or_default().into_bytes(),
            };
            bucket.set(key, &value).map(|()| "set".into()).map_err(fail)
        }
        "del" => bucket.delete(key).map(|()| "deleted".into()).map_err(fail),
        "fill" => repeat(n, |i| bucket.set(&format!("{key}{i}"), b"x")),
        "ops" => repeat(n, |_| bucket.exists(key).map(drop)),
        "gets" => repeat(n, |i| bucket.get(&format!("{key}{i}")).map(drop)),
        "incrs" => repeat(n, |_| atomics::increment(&bucket, key, 1).map(drop)),
        "list" => list(&bucket),
        "many" => {
            let keys: Vec<String> = (0..n).map(|i| format!("{key}{i}")).collect();
            let found = batch::get_many(&bucket, &keys).map_err(fail)?;
            Ok(format!("found={}", found.iter().flatten().count()))
        }
        "setmany" => {
            let size = param("bytes").and_then(|b| b.parse().ok()).unwrap_or(1);
            let pairs: Vec<(String, Vec<u8>)> = (0..n)
                .map(|i| (format!("{key}{i}"), vec![b'x'; size]))
                .collect();
            batch::set_many(&bucket, &pairs)
                .map(|()| format!("set {n}"))
                .map_err(fail)
        }
        _ => Err((400, format!("unknown operation {op:?}"))),
    }
}

/// Runs `f` n times; the first error answers with how many succeeded.
fn repeat(n: u64, mut f: impl FnMut(u64) -> Result<(), Error>) -> Answer {
    for i in 0..n {
        if let Err(e) = f(i) {
            let (status, text) = fail(e);
            return Err((status, format!("after {i}: {text}")));
        }
    }
    Ok(format!("done {n}"))
}

fn list(bucket: &Bucket) -> Answer {
    let mut cursor = None;
    let mut keys = 0;
    let mut pages = 0;
    loop {
        let page = bucket.list_keys(cursor).map_err(fail)?;
        pages += 1;
        keys += page.keys.len();
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(format!("keys={keys} pages={pages}")),
        }
    }
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let headers = Fields::from_list(&[(
        "content-type".to_string(),
        b"text/plain; charset=utf-8".to_vec(),
    )])
    .expect("static header is valid");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("body is taken once");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = body.write().expect("stream is taken once");
        stream
            .blocking_write_and_flush(text.as_bytes())
            .expect("client is reading");
    }
    OutgoingBody::finish(body, None).expect("body is complete");
}

export!(KvHttp);
