//! `wasi:keyvalue@0.2.0-draft` (`store`, `atomics`, `batch`) for guests.
//!
//! The runtime checks what only it knows: which buckets the component may
//! open (`allow.keyvalue`; any other is `access-denied`) and how many
//! operations the invocation has left (`limits.keyvalue_ops`). The data and
//! every other bound (key and value sizes, keys and bytes per bucket, the
//! size of one answer) belong to the [`KeyValue`] backend the composition
//! root injects: the durable store in `state_dir` (see `wasmgate-store`).
//!
//! Every refusal is a guest-side `error::other` (or `access-denied`) with a
//! sentence saying which bound; none traps or fails the host.

use crate::bindings::keyvalue::{atomics, batch, store};
use crate::invoke::State;
use std::sync::Arc;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList, WasmStr};

/// Most keys one batch call (`get-many`, `set-many`, `delete-many`) may
/// name.
pub const MAX_BATCH_KEYS: usize = 1000;

/// Most bytes of keys and values one `set-many` may carry.
pub const MAX_SET_MANY_BYTES: usize = 16 * 1024 * 1024;

/// Most buckets one invocation may hold open at once.
pub const MAX_OPEN_BUCKETS: u32 = 64;

/// One operation on one bucket, as the backend receives it (keys and
/// values already within the call's count bound; the backend checks sizes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The value of a key.
    Get(String),
    /// Sets a key.
    Set(String, Vec<u8>),
    /// Deletes a key (missing: nothing happens).
    Delete(String),
    /// Whether a key exists.
    Exists(String),
    /// One page of keys after the cursor (0: from the start).
    ListKeys(u64),
    /// Adds to a counter (ASCII decimal); a missing key starts at 0.
    Increment(String, u64),
    /// The values of several keys.
    GetMany(Vec<String>),
    /// Sets several keys, all or none.
    SetMany(Vec<(String, Vec<u8>)>),
    /// Deletes several keys, all or none.
    DeleteMany(Vec<String>),
}

impl Op {
    /// The operations it counts for against `limits.keyvalue_ops`: one per
    /// key of a batch, one otherwise.
    pub fn cost(&self) -> u32 {
        let n = match self {
            Op::GetMany(keys) | Op::DeleteMany(keys) => keys.len(),
            Op::SetMany(pairs) => pairs.len(),
            _ => 1,
        };
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }
}

/// What `get-many` answers: each key with its value, in the order asked;
/// none for a missing key.
pub type Pairs = Vec<Option<(String, Vec<u8>)>>;

/// The answer to an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Get`: the value, if the key exists.
    Value(Option<Vec<u8>>),
    /// `Set`, `Delete`, `SetMany`, `DeleteMany`.
    Done,
    /// `Exists`.
    Exists(bool),
    /// `ListKeys`: a page and the cursor of the next one.
    Keys(Vec<String>, Option<u64>),
    /// `Increment`: the new value.
    Counter(u64),
    /// `GetMany`: each key with its value, in order; none for a missing key.
    Pairs(Pairs),
}

/// Where the buckets live. `submit` must not block: it queues the operation
/// and the answer comes on the returned channel (a dropped sender reads as
/// "the store is closed").
pub trait KeyValue: Send + Sync {
    /// The longest key and the largest value it takes, in bytes: the batch
    /// calls read the guest's lists one entry at a time against them, so a
    /// guest cannot make the host copy more than this per entry.
    fn sizes(&self) -> (usize, usize);

    /// Runs `op` on `bucket`; an `Err` is a sentence for the guest.
    fn submit(&self, bucket: &str, op: Op)
    -> tokio::sync::oneshot::Receiver<Result<Reply, String>>;
}

/// An open bucket of one invocation (the `bucket` resource).
#[derive(Debug)]
pub struct Bucket {
    name: String,
}

/// The key-value state of one invocation.
#[derive(Default)]
pub(crate) struct KeyValueState {
    pub(crate) component: String,
    pub(crate) store: Option<Arc<dyn KeyValue>>,
    /// `allow.keyvalue`.
    pub(crate) grants: Arc<Vec<String>>,
    /// `limits.keyvalue_ops`, and what this invocation used.
    pub(crate) max_ops: u32,
    pub(crate) ops: u32,
    /// Buckets open now (at most [`MAX_OPEN_BUCKETS`]).
    pub(crate) open: u32,
    pub(crate) denials: Arc<crate::invoke::Denials>,
}

impl KeyValueState {
    /// Opens `name` if it is granted (an operation of the budget).
    fn open(&mut self, name: &str) -> Result<Bucket, store::Error> {
        self.charge(1)?;
        if self.open >= MAX_OPEN_BUCKETS {
            return Err(store::Error::Other(format!(
                "this invocation holds {MAX_OPEN_BUCKETS} buckets open, the most it may; drop one first"
            )));
        }
        if !self.grants.iter().any(|g| g == name) {
            let why = if self.grants.is_empty() {
                format!(
                    "component {:?} is not granted any key-value bucket (allow.keyvalue)",
                    self.component
                )
            } else {
                format!(
                    "bucket {name:?} is not in allow.keyvalue of component {:?}",
                    self.component
                )
            };
            if crate::invoke::Denials::count(&self.denials.keyvalue) {
                tracing::warn!(component = %self.component, bucket = name, reason = %why, "key-value bucket denied (logged once per component; later denials are counted)");
            } else {
                tracing::debug!(component = %self.component, bucket = name, reason = %why, "key-value bucket denied");
            }
            return Err(store::Error::AccessDenied);
        }
        if self.store.is_none() {
            return Err(store::Error::Other(
                "this host has no key-value store (wasmgate invoke runs without one unless given --keyvalue)".into(),
            ));
        }
        self.open += 1;
        Ok(Bucket {
            name: name.to_string(),
        })
    }

    /// Counts `cost` operations against `limits.keyvalue_ops`.
    fn charge(&mut self, cost: u32) -> Result<(), store::Error> {
        if self.ops.saturating_add(cost) > self.max_ops {
            return Err(store::Error::Other(format!(
                "this invocation has made {} key-value operations; {cost} more would pass its limit of {} (limits.keyvalue_ops of component {:?})",
                self.ops, self.max_ops, self.component
            )));
        }
        self.ops += cost;
        Ok(())
    }

    /// The store's key and value size bounds.
    fn sizes(&self) -> (usize, usize) {
        self.store.as_ref().map_or((0, 0), |kv| kv.sizes())
    }

    /// Charges the operation and runs it.
    async fn run(&mut self, bucket: &str, op: Op) -> Result<Reply, store::Error> {
        self.charge(op.cost())?;
        let Some(kv) = &self.store else {
            return Err(store::Error::Other("no key-value store".into()));
        };
        match kv.submit(bucket, op).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(why)) => Err(store::Error::Other(why)),
            Err(_) => Err(store::Error::Other(
                "the key-value store is closed (the gateway is stopping)".into(),
            )),
        }
    }
}

fn too_many(n: usize) -> store::Error {
    store::Error::Other(format!(
        "a batch may name at most {MAX_BATCH_KEYS} keys; this one names {n}"
    ))
}

fn unexpected(reply: &Reply) -> store::Error {
    store::Error::Other(format!("the store answered {reply:?} unexpectedly"))
}

impl State {
    fn bucket_name(&self, b: &Resource<Bucket>) -> Result<String, store::Error> {
        self.table
            .get(b)
            .map(|b| b.name.clone())
            .map_err(|e| store::Error::Other(e.to_string()))
    }

    async fn kv(&mut self, b: &Resource<Bucket>, op: Op) -> Result<Reply, store::Error> {
        let name = self.bucket_name(b)?;
        self.keyvalue.run(&name, op).await
    }
}

impl store::Host for State {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, store::Error> {
        let bucket = self.keyvalue.open(&identifier)?;
        self.table
            .push(bucket)
            .map_err(|e| store::Error::Other(e.to_string()))
    }
}

impl store::HostBucket for State {
    async fn get(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, store::Error> {
        match self.kv(&b, Op::Get(key)).await? {
            Reply::Value(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    async fn set(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), store::Error> {
        self.kv(&b, Op::Set(key, value)).await.map(drop)
    }

    async fn delete(&mut self, b: Resource<Bucket>, key: String) -> Result<(), store::Error> {
        self.kv(&b, Op::Delete(key)).await.map(drop)
    }

    async fn exists(&mut self, b: Resource<Bucket>, key: String) -> Result<bool, store::Error> {
        match self.kv(&b, Op::Exists(key)).await? {
            Reply::Exists(e) => Ok(e),
            other => Err(unexpected(&other)),
        }
    }

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, store::Error> {
        match self.kv(&b, Op::ListKeys(cursor.unwrap_or(0))).await? {
            Reply::Keys(keys, cursor) => Ok(store::KeyResponse { keys, cursor }),
            other => Err(unexpected(&other)),
        }
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        self.keyvalue.open = self.keyvalue.open.saturating_sub(1);
        Ok(())
    }
}

impl atomics::Host for State {
    async fn increment(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, store::Error> {
        match self.kv(&b, Op::Increment(key, delta)).await? {
            Reply::Counter(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }
}

/// The generated `batch` functions take lists the host has already copied
/// out of the guest; [`add_batch_to_linker`] replaces them with ones that
/// read the lists an entry at a time. These stay for the trait.
impl batch::Host for State {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Pairs, store::Error> {
        if keys.len() > MAX_BATCH_KEYS {
            return Err(too_many(keys.len()));
        }
        match self.kv(&b, Op::GetMany(keys)).await? {
            Reply::Pairs(pairs) => Ok(pairs),
            other => Err(unexpected(&other)),
        }
    }

    async fn set_many(
        &mut self,
        b: Resource<Bucket>,
        pairs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), store::Error> {
        if pairs.len() > MAX_BATCH_KEYS {
            return Err(too_many(pairs.len()));
        }
        self.kv(&b, Op::SetMany(pairs)).await.map(drop)
    }

    async fn delete_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), store::Error> {
        if keys.len() > MAX_BATCH_KEYS {
            return Err(too_many(keys.len()));
        }
        self.kv(&b, Op::DeleteMany(keys)).await.map(drop)
    }
}

/// A guest's list, read lazily: its length is checked before any entry is
/// copied, and each entry's size before it is. (A list's entries may all
/// point at the same bytes of guest memory, so a list copied whole could
/// cost the host its length times the guest's memory.)
fn read_keys(
    store: &mut StoreContextMut<'_, State>,
    list: &WasmList<WasmStr>,
) -> Result<Vec<String>, store::Error> {
    if list.len() > MAX_BATCH_KEYS {
        return Err(too_many(list.len()));
    }
    let (max_key, _) = store.data().keyvalue.sizes();
    let mut keys = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        let Some(entry) = list.get(&mut *store, i) else {
            break;
        };
        let key = entry.map_err(|e| store::Error::Other(e.to_string()))?;
        let key = key
            .to_str(&*store)
            .map_err(|e| store::Error::Other(e.to_string()))?;
        keys.push(checked_key(&key, max_key)?.to_string());
    }
    Ok(keys)
}

fn checked_key(key: &str, max: usize) -> Result<&str, store::Error> {
    if key.len() > max {
        return Err(store::Error::Other(format!(
            "a key is {} bytes; keys are at most {max} bytes ([keyvalue] max_key_bytes)",
            key.len()
        )));
    }
    Ok(key)
}

type PairList = WasmList<(WasmStr, WasmList<u8>)>;

/// `set-many`'s pairs, read lazily (see [`read_keys`]), at most
/// [`MAX_SET_MANY_BYTES`] in all.
fn read_pairs(
    store: &mut StoreContextMut<'_, State>,
    list: &PairList,
) -> Result<Vec<(String, Vec<u8>)>, store::Error> {
    if list.len() > MAX_BATCH_KEYS {
        return Err(too_many(list.len()));
    }
    let (max_key, max_value) = store.data().keyvalue.sizes();
    let mut pairs = Vec::with_capacity(list.len());
    let mut total = 0;
    for i in 0..list.len() {
        let Some(entry) = list.get(&mut *store, i) else {
            break;
        };
        let (key, value) = entry.map_err(|e| store::Error::Other(e.to_string()))?;
        let key = key
            .to_str(&*store)
            .map_err(|e| store::Error::Other(e.to_string()))?;
        let key = checked_key(&key, max_key)?.to_string();
        let value = value.as_le_slice(&*store);
        if value.len() > max_value {
            return Err(store::Error::Other(format!(
                "the value of {key:?} is {} bytes; values are at most {max_value} bytes ([keyvalue] max_value_bytes)",
                value.len()
            )));
        }
        total += key.len() + value.len();
        if total > MAX_SET_MANY_BYTES {
            return Err(store::Error::Other(format!(
                "a set-many may carry at most {MAX_SET_MANY_BYTES} bytes of keys and values"
            )));
        }
        pairs.push((key, value.to_vec()));
    }
    Ok(pairs)
}

/// Replaces the generated `wasi:keyvalue/batch` functions with ones that
/// read the guest's lists lazily (see [`read_keys`]).
pub(crate) fn add_batch_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut batch = linker.instance("wasi:keyvalue/batch@0.2.0-draft")?;
    batch.func_wrap_async(
        "get-many",
        |mut store: StoreContextMut<'_, State>,
         (b, keys): (Resource<Bucket>, WasmList<WasmStr>)| {
            Box::new(async move {
                let result = match read_keys(&mut store, &keys) {
                    Ok(keys) => match store.data_mut().kv(&b, Op::GetMany(keys)).await {
                        Ok(Reply::Pairs(pairs)) => Ok(pairs),
                        Ok(other) => Err(unexpected(&other)),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                Ok((result,))
            })
        },
    )?;
    batch.func_wrap_async(
        "set-many",
        |mut store: StoreContextMut<'_, State>, (b, pairs): (Resource<Bucket>, PairList)| {
            Box::new(async move {
                let result = match read_pairs(&mut store, &pairs) {
                    Ok(pairs) => store.data_mut().kv(&b, Op::SetMany(pairs)).await.map(drop),
                    Err(e) => Err(e),
                };
                Ok((result,))
            })
        },
    )?;
    batch.func_wrap_async(
        "delete-many",
        |mut store: StoreContextMut<'_, State>,
         (b, keys): (Resource<Bucket>, WasmList<WasmStr>)| {
            Box::new(async move {
                let result = match read_keys(&mut store, &keys) {
                    Ok(keys) => store
                        .data_mut()
                        .kv(&b, Op::DeleteMany(keys))
                        .await
                        .map(drop),
                    Err(e) => Err(e),
                };
                Ok((result,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
