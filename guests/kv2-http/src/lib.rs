//! `kv2-http`: `wasi:keyvalue@0.2.0-draft2` (the version Spin 3 and 4
//! guests import) over HTTP, for the tests. Built with plain `wit-bindgen`
//! against the standard `wasi:http/proxy` and Spin's draft2 WIT.
//!
//! `GET [/v2]/OP/BUCKET/KEY?n=N&d=DELTA`:
//!
//! | OP     | does                                                          |
//! |--------|---------------------------------------------------------------|
//! | `get`  | answers KEY's value (404 without one)                         |
//! | `incr` | increments KEY by `d` (an s64; 1), answers the new value      |
//! | `cas`  | two `cas` on KEY, swaps the first (`one`), then the second:   |
//! |        | `first=ok second=cas-failed current=one retry=ok`             |
//! | `list` | lists every key, page by page (string cursors): `keys=K pages=P` |
//! | `many` | `get-many` of KEY0 … KEY(n-1): `found=F of N`                 |

wit_bindgen::generate!({
    inline: r#"
        package example:kv2-http;

        world kv2-http {
            include wasi:http/proxy@0.2.12;
            include wasi:keyvalue/imports@0.2.0-draft2;
        }
    "#,
    path: ["../../wit", "../../host/runtime/wit/keyvalue-draft2"],
    world: "example:kv2-http/kv2-http",
    generate_all,
});

use exports::wasi::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::keyvalue0_2_0_draft2::atomics::{self, Cas, CasError};
use wasi::keyvalue0_2_0_draft2::batch;
use wasi::keyvalue0_2_0_draft2::store::{self, Bucket, Error};

struct Kv2Http;

impl Guest for Kv2Http {
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
    let path = path.strip_prefix("/v2").unwrap_or(path);
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let op = parts.next().unwrap_or_default();
    let bucket = store::open(parts.next().unwrap_or_default()).map_err(fail)?;
    let key = parts.next().unwrap_or_default();
    match op {
        "get" => match bucket.get(key).map_err(fail)? {
            Some(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
            None => Err((404, format!("no key {key:?}"))),
        },
        "incr" => {
            let d: i64 = param("d").and_then(|d| d.parse().ok()).unwrap_or(1);
            atomics::increment(&bucket, key, d)
                .map(|v| v.to_string())
                .map_err(fail)
        }
        "cas" => cas(&bucket, key),
        "list" => list(&bucket),
        "many" => {
            let n: u64 = param("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            let keys: Vec<String> = (0..n).map(|i| format!("{key}{i}")).collect();
            let found = batch::get_many(&bucket, &keys).map_err(fail)?;
            let with_value = found.iter().filter(|(_, v)| v.is_some()).count();
            Ok(format!("found={with_value} of {}", found.len()))
        }
        _ => Err((400, format!("unknown operation {op:?}"))),
    }
}

fn cas(bucket: &Bucket, key: &str) -> Answer {
    let first = Cas::new(bucket, key).map_err(fail)?;
    let second = Cas::new(bucket, key).map_err(fail)?;
    let swapped = |r: Result<(), CasError>| match r {
        Ok(()) => "ok".to_string(),
        Err(CasError::CasFailed(_)) => "cas-failed".to_string(),
        Err(CasError::StoreError(e)) => format!("{e:?}"),
    };
    let first = swapped(atomics::swap(first, b"one"));
    // The failed swap hands the cas back updated: reading it and swapping
    // again with it succeeds (nothing else writes the key meanwhile).
    let (second, current, retry) = match atomics::swap(second, b"two") {
        Err(CasError::CasFailed(again)) => {
            let now = again.current().map_err(fail)?.unwrap_or_default();
            (
                "cas-failed".to_string(),
                String::from_utf8_lossy(&now).into_owned(),
                swapped(atomics::swap(again, b"two")),
            )
        }
        other => (swapped(other), String::new(), String::new()),
    };
    Ok(format!(
        "first={first} second={second} current={current} retry={retry}"
    ))
}

fn list(bucket: &Bucket) -> Answer {
    let mut cursor = None;
    let mut keys = 0;
    let mut pages = 0;
    loop {
        let page = bucket.list_keys(cursor.as_deref()).map_err(fail)?;
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

export!(Kv2Http);
