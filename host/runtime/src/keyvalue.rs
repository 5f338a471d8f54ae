//! `wasi:keyvalue` for guests, both versions guests are built against:
//! `0.2.0-draft` ([`draft`]: wasmtime's and wasmCloud's hosts) and
//! `0.2.0-draft2` ([`draft2`]: Spin 3 and 4, with compare-and-swap), on the
//! same buckets, grants and budget.
//!
//! The runtime checks what only it knows: which buckets the component may
//! open (`allow.keyvalue`; any other is `access-denied`), how many
//! operations the invocation has left (`limits.keyvalue_ops`) and how many
//! resources it holds open. The data and every other bound (key and value
//! sizes, keys and bytes per bucket, the size of one answer) belong to the
//! [`KeyValue`] backend the composition root injects: the durable store in
//! `state_dir` (see `wasmgate-store`).
//!
//! Every refusal is a guest-side `error::other` (or `access-denied`) with a
//! sentence saying which bound; none traps or fails the host.

pub(crate) mod draft;
pub(crate) mod draft2;

use crate::invoke::State;
use std::sync::Arc;
use wasmtime::StoreContextMut;
use wasmtime::component::{ComponentType, Lower, Resource, WasmList, WasmStr};

/// Most keys one batch call (`get-many`, `set-many`, `delete-many`) may
/// name.
pub const MAX_BATCH_KEYS: usize = 1000;

/// Most bytes of keys and values one `set-many` may carry.
pub const MAX_SET_MANY_BYTES: usize = 16 * 1024 * 1024;

/// Most resources (buckets and `cas` handles) one invocation may hold open
/// at once.
pub const MAX_OPEN: u32 = 64;

/// A counter's step: `0.2.0-draft` counts in `u64`, `0.2.0-draft2` in
/// `s64`; the stored counter (ASCII decimal) is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// A `u64` step; the result must fit a `u64`.
    Unsigned(u64),
    /// An `s64` step; the result must fit an `s64`.
    Signed(i64),
}

/// What identifies one value of a key: its row and how often it was set.
/// (A key deleted and set again gets a new row, so an old token never
/// matches it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The row of the key.
    pub row: i64,
    /// Sets of the key since its row was created.
    pub version: i64,
}

/// One operation on one bucket, as the backend receives it (batches within
/// [`MAX_BATCH_KEYS`]; the backend checks sizes).
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
    Increment(String, Delta),
    /// The values of several keys.
    GetMany(Vec<String>),
    /// Sets several keys, all or none.
    SetMany(Vec<(String, Vec<u8>)>),
    /// Deletes several keys, all or none.
    DeleteMany(Vec<String>),
    /// The token of a key's value now (none: the key does not exist).
    Snapshot(String),
    /// Sets a key if its token is still the one given (none: if it still
    /// does not exist).
    Swap(String, Option<Token>, Vec<u8>),
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

/// What `get-many` answers: each key with its value (none for a missing
/// key), in the order asked.
pub type Pairs = Vec<(String, Option<Vec<u8>>)>;

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
    Counter(i128),
    /// `GetMany`.
    Pairs(Pairs),
    /// `Snapshot`.
    Snapshot(Option<Token>),
    /// `Swap`: it set the key.
    Swapped,
    /// `Swap`: the key had changed; its token now, read in the same
    /// transaction (for the guest's next try).
    SwapFailed(Option<Token>),
}

/// Who makes an operation: recorded with each change of a bucket that has
/// a change stream. `None` for an operator (`wasmgate kv`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The invocation id.
    pub invocation: String,
    /// The component.
    pub component: String,
    /// The invocation's trigger.
    pub trigger: String,
}

/// Where the buckets live. `submit` must not block: it queues the operation
/// and the answer comes on the returned channel (a dropped sender reads as
/// "the store is closed").
pub trait KeyValue: Send + Sync {
    /// The longest key and the largest value it takes, in bytes: the batch
    /// calls read the guest's lists one entry at a time against them, so a
    /// guest cannot make the host copy more than this per entry.
    fn sizes(&self) -> (usize, usize);

    /// Runs `op` on `bucket` for `origin`; an `Err` is a sentence for the
    /// guest.
    fn submit(
        &self,
        bucket: &str,
        op: Op,
        origin: Option<Arc<Origin>>,
    ) -> tokio::sync::oneshot::Receiver<Result<Reply, String>>;
}

/// An open bucket of one invocation (the `bucket` resource of either
/// version).
#[derive(Debug)]
pub struct Bucket {
    name: String,
}

/// A key as it was when the guest made the handle (`0.2.0-draft2`'s `cas`).
#[derive(Debug)]
pub struct Cas {
    bucket: String,
    key: String,
    token: Option<Token>,
}

/// Why a call failed, before it is the error type of a WIT version.
#[derive(Debug)]
pub(crate) enum Refusal {
    AccessDenied,
    Other(String),
}

/// The key-value state of one invocation.
pub(crate) struct KeyValueState {
    pub(crate) component: String,
    /// The running invocation (set for each one).
    pub(crate) origin: Option<Arc<Origin>>,
    pub(crate) store: Option<Arc<dyn KeyValue>>,
    /// `allow.keyvalue`.
    pub(crate) grants: Arc<Vec<String>>,
    /// `limits.keyvalue_ops`, and what this invocation used.
    pub(crate) max_ops: u32,
    pub(crate) ops: u32,
    /// Resources open now (at most [`MAX_OPEN`]).
    pub(crate) open: u32,
    pub(crate) denials: Arc<crate::invoke::Denials>,
}

impl KeyValueState {
    /// Opens `name` if it is granted (an operation of the budget).
    fn open(&mut self, name: &str) -> Result<Bucket, Refusal> {
        self.charge(1)?;
        self.check_open()?;
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
            return Err(Refusal::AccessDenied);
        }
        if self.store.is_none() {
            return Err(Refusal::Other(
                "this host has no key-value store (wasmgate invoke runs without one unless given --keyvalue)".into(),
            ));
        }
        Ok(Bucket {
            name: name.to_string(),
        })
    }

    /// Whether one more resource may be opened.
    fn check_open(&self) -> Result<(), Refusal> {
        if self.open >= MAX_OPEN {
            return Err(Refusal::Other(format!(
                "this invocation holds {MAX_OPEN} key-value resources (buckets and cas handles) open, the most it may; drop one first"
            )));
        }
        Ok(())
    }

    /// Counts `cost` operations against `limits.keyvalue_ops`.
    fn charge(&mut self, cost: u32) -> Result<(), Refusal> {
        if self.ops.saturating_add(cost) > self.max_ops {
            return Err(Refusal::Other(format!(
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
    async fn run(&mut self, bucket: &str, op: Op) -> Result<Reply, Refusal> {
        self.charge(op.cost())?;
        let Some(kv) = &self.store else {
            return Err(Refusal::Other("no key-value store".into()));
        };
        match kv.submit(bucket, op, self.origin.clone()).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(why)) => Err(Refusal::Other(why)),
            Err(_) => Err(Refusal::Other(
                "the key-value store is closed (the gateway is stopping)".into(),
            )),
        }
    }
}

fn too_many(n: usize) -> Refusal {
    Refusal::Other(format!(
        "a batch may name at most {MAX_BATCH_KEYS} keys; this one names {n}"
    ))
}

fn unexpected(reply: &Reply) -> Refusal {
    Refusal::Other(format!("the store answered {reply:?} unexpectedly"))
}

fn table_error(e: impl std::fmt::Display) -> Refusal {
    Refusal::Other(e.to_string())
}

impl State {
    /// Opens a bucket resource.
    fn kv_open(&mut self, name: &str) -> Result<Resource<Bucket>, Refusal> {
        let bucket = self.keyvalue.open(name)?;
        let r = self.table.push(bucket).map_err(table_error)?;
        self.keyvalue.open += 1;
        Ok(r)
    }

    /// Closes a bucket or cas resource.
    fn kv_closed(&mut self) {
        self.keyvalue.open = self.keyvalue.open.saturating_sub(1);
    }

    fn bucket_name(&self, b: &Resource<Bucket>) -> Result<String, Refusal> {
        self.table
            .get(b)
            .map(|b| b.name.clone())
            .map_err(table_error)
    }

    /// Runs `op` on an open bucket.
    async fn kv(&mut self, b: &Resource<Bucket>, op: Op) -> Result<Reply, Refusal> {
        let name = self.bucket_name(b)?;
        self.keyvalue.run(&name, op).await
    }

    async fn kv_get(
        &mut self,
        b: &Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        match self.kv(b, Op::Get(key)).await? {
            Reply::Value(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    async fn kv_exists(&mut self, b: &Resource<Bucket>, key: String) -> Result<bool, Refusal> {
        match self.kv(b, Op::Exists(key)).await? {
            Reply::Exists(e) => Ok(e),
            other => Err(unexpected(&other)),
        }
    }

    async fn kv_list(
        &mut self,
        b: &Resource<Bucket>,
        after: u64,
    ) -> Result<(Vec<String>, Option<u64>), Refusal> {
        match self.kv(b, Op::ListKeys(after)).await? {
            Reply::Keys(keys, next) => Ok((keys, next)),
            other => Err(unexpected(&other)),
        }
    }

    async fn kv_increment(
        &mut self,
        b: &Resource<Bucket>,
        key: String,
        delta: Delta,
    ) -> Result<i128, Refusal> {
        match self.kv(b, Op::Increment(key, delta)).await? {
            Reply::Counter(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    async fn kv_get_many(
        &mut self,
        b: &Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Pairs, Refusal> {
        match self.kv(b, Op::GetMany(keys)).await? {
            Reply::Pairs(pairs) => Ok(pairs),
            other => Err(unexpected(&other)),
        }
    }
}

/// A guest's list of keys, read lazily: its length is checked before any
/// entry is copied, and each entry's size before it is. (A list's entries
/// may all point at the same bytes of guest memory, so a list copied whole
/// could cost the host its length times the guest's memory.)
fn read_keys(
    store: &mut StoreContextMut<'_, State>,
    list: &WasmList<WasmStr>,
) -> Result<Vec<String>, Refusal> {
    if list.len() > MAX_BATCH_KEYS {
        return Err(too_many(list.len()));
    }
    let (max_key, _) = store.data().keyvalue.sizes();
    let mut keys = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        let Some(entry) = list.get(&mut *store, i) else {
            break;
        };
        let key = entry.map_err(table_error)?;
        let key = key.to_str(&*store).map_err(table_error)?;
        keys.push(checked_key(&key, max_key)?.to_string());
    }
    Ok(keys)
}

fn checked_key(key: &str, max: usize) -> Result<&str, Refusal> {
    if key.len() > max {
        return Err(Refusal::Other(format!(
            "a key is {} bytes; keys are at most {max} bytes ([keyvalue] max_key_bytes)",
            key.len()
        )));
    }
    Ok(key)
}

/// `set-many`'s list of pairs.
type PairList = WasmList<(WasmStr, WasmList<u8>)>;

/// `set-many`'s pairs, read lazily (see [`read_keys`]), at most
/// [`MAX_SET_MANY_BYTES`] in all.
fn read_pairs(
    store: &mut StoreContextMut<'_, State>,
    list: &PairList,
) -> Result<Vec<(String, Vec<u8>)>, Refusal> {
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
        let (key, value) = entry.map_err(table_error)?;
        let key = key.to_str(&*store).map_err(table_error)?;
        let key = checked_key(&key, max_key)?.to_string();
        let value = value.as_le_slice(&*store);
        if value.len() > max_value {
            return Err(Refusal::Other(format!(
                "the value of {key:?} is {} bytes; values are at most {max_value} bytes ([keyvalue] max_value_bytes)",
                value.len()
            )));
        }
        total += key.len() + value.len();
        if total > MAX_SET_MANY_BYTES {
            return Err(Refusal::Other(format!(
                "a set-many may carry at most {MAX_SET_MANY_BYTES} bytes of keys and values"
            )));
        }
        pairs.push((key, value.to_vec()));
    }
    Ok(pairs)
}

/// `get-many`, reading the keys lazily.
async fn get_many(
    store: &mut StoreContextMut<'_, State>,
    b: &Resource<Bucket>,
    keys: &WasmList<WasmStr>,
) -> Result<Pairs, Refusal> {
    let keys = read_keys(store, keys)?;
    store.data_mut().kv_get_many(b, keys).await
}

/// `set-many`, reading the pairs lazily.
async fn set_many(
    store: &mut StoreContextMut<'_, State>,
    b: &Resource<Bucket>,
    pairs: &PairList,
) -> Result<(), Refusal> {
    let pairs = read_pairs(store, pairs)?;
    store.data_mut().kv(b, Op::SetMany(pairs)).await.map(drop)
}

/// `delete-many`, reading the keys lazily.
async fn delete_many(
    store: &mut StoreContextMut<'_, State>,
    b: &Resource<Bucket>,
    keys: &WasmList<WasmStr>,
) -> Result<(), Refusal> {
    let keys = read_keys(store, keys)?;
    store.data_mut().kv(b, Op::DeleteMany(keys)).await.map(drop)
}

/// Replaces a version's generated `batch` functions (which take lists the
/// host has already copied out of the guest) with ones that read the lists
/// an entry at a time: `E` is the version's error type, `answer` turns the
/// `get-many` answer into the version's shape.
fn link_lazy_batch<E, A>(
    linker: &mut wasmtime::component::Linker<State>,
    instance: &str,
    answer: fn(Pairs) -> A,
) -> wasmtime::Result<()>
where
    E: From<Refusal> + ComponentType + Lower + Send + Sync + 'static,
    A: ComponentType + Lower + Send + Sync + 'static,
{
    linker.allow_shadowing(true);
    let mut batch = linker.instance(instance)?;
    batch.func_wrap_async(
        "get-many",
        move |mut store: StoreContextMut<'_, State>,
              (b, keys): (Resource<Bucket>, WasmList<WasmStr>)| {
            Box::new(async move {
                let r = get_many(&mut store, &b, &keys).await;
                Ok((r.map(answer).map_err(E::from),))
            })
        },
    )?;
    batch.func_wrap_async(
        "set-many",
        |mut store: StoreContextMut<'_, State>, (b, pairs): (Resource<Bucket>, PairList)| {
            Box::new(async move {
                let r = set_many(&mut store, &b, &pairs).await;
                Ok((r.map_err(E::from),))
            })
        },
    )?;
    batch.func_wrap_async(
        "delete-many",
        |mut store: StoreContextMut<'_, State>,
         (b, keys): (Resource<Bucket>, WasmList<WasmStr>)| {
            Box::new(async move {
                let r = delete_many(&mut store, &b, &keys).await;
                Ok((r.map_err(E::from),))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Adds both versions to the linker.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<State>,
) -> wasmtime::Result<()> {
    draft::add_to_linker(linker)?;
    draft2::add_to_linker(linker)
}
