//! `wasmgate kv`: the key-value buckets of a gateway, on its own disk, while
//! it runs or not. Each command goes through the same store code as the
//! guests (bounds, usage, group commit); SQLite's locks order it with a
//! running gateway's writes.

use crate::cli::{Fatal, KvArgs, KvCommand, load_manifest};
use std::io::{Read as _, Write as _};
use std::process::ExitCode;
use wasmgate_manifest::keyvalue::validate_bucket_name;
use wasmgate_runtime::keyvalue::{Op, Reply};
use wasmgate_store::keyvalue::KeyValueStore;

/// Runs `wasmgate kv`.
pub async fn kv(args: KvArgs) -> Result<ExitCode, Fatal> {
    let m = load_manifest(&args.file)?;
    let bounds = m.keyvalue.bounds();
    let max_value = bounds.max_value_bytes;
    let store = KeyValueStore::open(&KeyValueStore::path_in(&m.state_dir()), bounds.clone())
        .map_err(Fatal)?;
    let mut out = std::io::stdout().lock();
    match args.command {
        KvCommand::Buckets { json } => {
            let usage = store.usage().await.map_err(Fatal)?;
            if json {
                let text = serde_json::to_string_pretty(&usage).expect("usage serializes");
                let _ = writeln!(out, "{text}");
            } else {
                let _ = writeln!(out, "{:<24} {:>10} {:>14}", "BUCKET", "KEYS", "BYTES");
                for u in usage {
                    let b = bounds.bucket(&u.name);
                    let _ = writeln!(
                        out,
                        "{:<24} {:>10} {:>14}   (max {} keys, {} bytes)",
                        u.name, u.keys, u.bytes, b.max_keys, b.max_bytes
                    );
                }
            }
        }
        KvCommand::List { bucket } => {
            check(&bucket)?;
            let mut cursor = 0;
            loop {
                match run(&store, &bucket, Op::ListKeys(cursor)).await? {
                    Reply::Keys(keys, next) => {
                        for k in keys {
                            let _ = writeln!(out, "{k}");
                        }
                        match next {
                            Some(c) => cursor = c,
                            None => break,
                        }
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }
        KvCommand::Get { bucket, key } => {
            check(&bucket)?;
            match run(&store, &bucket, Op::Get(key.clone())).await? {
                Reply::Value(Some(v)) => {
                    let _ = out.write_all(&v);
                }
                Reply::Value(None) => {
                    eprintln!("bucket {bucket:?} has no key {key:?}");
                    return Ok(ExitCode::from(1));
                }
                other => return Err(unexpected(&other)),
            }
        }
        KvCommand::Set { bucket, key, value } => {
            check(&bucket)?;
            let value = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut v = Vec::new();
                    std::io::stdin()
                        .take(max_value + 1)
                        .read_to_end(&mut v)
                        .map_err(|e| Fatal(format!("reading the value from stdin: {e}")))?;
                    v
                }
            };
            run(&store, &bucket, Op::Set(key, value)).await?;
        }
        KvCommand::Delete { bucket, key } => {
            check(&bucket)?;
            run(&store, &bucket, Op::Delete(key)).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(bucket: &str) -> Result<(), Fatal> {
    validate_bucket_name(bucket).map_err(Fatal)
}

/// Runs `op`; a refusal (a bound, a failure) is the command's error, exit 2.
async fn run(store: &KeyValueStore, bucket: &str, op: Op) -> Result<Reply, Fatal> {
    store.run(bucket, op).await.map_err(Fatal)
}

fn unexpected(reply: &Reply) -> Fatal {
    Fatal(format!("the store answered {reply:?} unexpectedly"))
}
