//! `wasi:keyvalue@0.2.0-draft2` (Spin 3 and 4): `s64` counters, string
//! cursors, `get-many` answering `list<tuple<string, option<list<u8>>>>`,
//! and compare-and-swap.
//!
//! A `cas` handle holds the key's token (its row and how often it was set)
//! from when it was made, not its value: `swap` sets the key only if the
//! token is the same now, so a value written and written back in between
//! still fails the swap, and a handle costs the host no value bytes. A
//! failed `swap` hands the handle back updated to the key's token then (as
//! the WIT requires), so `current` and a second `swap` retry from there.
//! `current` reads the key's value now.

use super::{Bucket, Cas, Delta, Op, Refusal, Reply, unexpected};
use crate::bindings::draft2::wasi::keyvalue::{atomics, batch, store};
use crate::invoke::State;
use wasmtime::component::{Linker, Resource};

impl From<Refusal> for store::Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::AccessDenied => store::Error::AccessDenied,
            Refusal::Other(why) => store::Error::Other(why),
        }
    }
}

fn parse_cursor(cursor: Option<String>) -> Result<u64, store::Error> {
    match cursor {
        None => Ok(0),
        Some(c) => c.parse().map_err(|_| {
            store::Error::Other(format!(
                "{c:?} is not a cursor list-keys gave (start with none)"
            ))
        }),
    }
}

impl store::Host for State {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, store::Error> {
        Ok(self.kv_open(&identifier)?)
    }
}

impl store::HostBucket for State {
    async fn get(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, store::Error> {
        Ok(self.kv_get(&b, key).await?)
    }

    async fn set(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), store::Error> {
        Ok(self.kv(&b, Op::Set(key, value)).await.map(drop)?)
    }

    async fn delete(&mut self, b: Resource<Bucket>, key: String) -> Result<(), store::Error> {
        Ok(self.kv(&b, Op::Delete(key)).await.map(drop)?)
    }

    async fn exists(&mut self, b: Resource<Bucket>, key: String) -> Result<bool, store::Error> {
        Ok(self.kv_exists(&b, key).await?)
    }

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<String>,
    ) -> Result<store::KeyResponse, store::Error> {
        let after = parse_cursor(cursor)?;
        let (keys, next) = self.kv_list(&b, after).await?;
        Ok(store::KeyResponse {
            keys,
            cursor: next.map(|n| n.to_string()),
        })
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        self.kv_closed();
        Ok(())
    }
}

impl atomics::HostCas for State {
    async fn new(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Result<Resource<Cas>, store::Error> {
        self.keyvalue.check_open()?;
        super::checked_key(&key, self.keyvalue.sizes().0)?;
        let bucket = self.bucket_name(&b)?;
        let token = match self.kv(&b, Op::Snapshot(key.clone())).await? {
            Reply::Snapshot(t) => t,
            other => return Err(unexpected(&other).into()),
        };
        let cas = self
            .table
            .push(Cas { bucket, key, token })
            .map_err(|e| store::Error::Other(e.to_string()))?;
        self.keyvalue.open += 1;
        Ok(cas)
    }

    async fn current(&mut self, cas: Resource<Cas>) -> Result<Option<Vec<u8>>, store::Error> {
        let (bucket, key) = {
            let c = self
                .table
                .get(&cas)
                .map_err(|e| store::Error::Other(e.to_string()))?;
            (c.bucket.clone(), c.key.clone())
        };
        match self.keyvalue.run(&bucket, Op::Get(key)).await? {
            Reply::Value(v) => Ok(v),
            other => Err(unexpected(&other).into()),
        }
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        self.kv_closed();
        Ok(())
    }
}

impl atomics::Host for State {
    async fn increment(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Result<i64, store::Error> {
        let n = self.kv_increment(&b, key, Delta::Signed(delta)).await?;
        i64::try_from(n).map_err(|_| store::Error::Other(format!("the counter is {n}, not an s64")))
    }

    async fn swap(&mut self, cas: Resource<Cas>, value: Vec<u8>) -> Result<(), atomics::CasError> {
        let store_error = |e: store::Error| atomics::CasError::StoreError(e);
        let c = self
            .table
            .delete(cas)
            .map_err(|e| store_error(store::Error::Other(e.to_string())))?;
        self.kv_closed();
        let op = Op::Swap(c.key.clone(), c.token, value);
        match self.keyvalue.run(&c.bucket, op).await {
            Ok(Reply::Swapped) => Ok(()),
            Ok(Reply::SwapFailed(now)) => {
                // Back to the guest with the key's token now, to read
                // (`current`) and try again.
                let again = self
                    .table
                    .push(Cas { token: now, ..c })
                    .map_err(|e| store_error(store::Error::Other(e.to_string())))?;
                self.keyvalue.open += 1;
                Err(atomics::CasError::CasFailed(again))
            }
            Ok(other) => Err(store_error(unexpected(&other).into())),
            Err(e) => Err(store_error(e.into())),
        }
    }
}

/// See the `0.2.0-draft` batch: the functions [`add_to_linker`] puts in
/// their place read the guest's lists lazily.
impl batch::Host for State {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<super::Pairs, store::Error> {
        Ok(self.kv_get_many(&b, keys).await?)
    }

    async fn set_many(
        &mut self,
        b: Resource<Bucket>,
        pairs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), store::Error> {
        Ok(self.kv(&b, Op::SetMany(pairs)).await.map(drop)?)
    }

    async fn delete_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), store::Error> {
        Ok(self.kv(&b, Op::DeleteMany(keys)).await.map(drop)?)
    }
}

/// Links this version's `store`, `atomics` and `batch` (the batch
/// functions reading the guest's lists lazily).
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    crate::bindings::draft2::Imports::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
        linker,
        |s| s,
    )?;
    super::link_lazy_batch::<store::Error, super::Pairs>(
        linker,
        "wasi:keyvalue/batch@0.2.0-draft2",
        |pairs| pairs,
    )
}
