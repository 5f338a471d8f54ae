//! `wasi:keyvalue@0.2.0-draft`: `u64` counters, `u64` cursors, and
//! `get-many` answering `list<option<tuple<string, list<u8>>>>`.

use super::{Bucket, Delta, Refusal};
use crate::bindings::keyvalue::{atomics, batch, store};
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

/// This version's `get-many` answer.
type Answer = Vec<Option<(String, Vec<u8>)>>;

fn answer(pairs: super::Pairs) -> Answer {
    pairs.into_iter().map(|(k, v)| v.map(|v| (k, v))).collect()
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
        Ok(self.kv(&b, super::Op::Set(key, value)).await.map(drop)?)
    }

    async fn delete(&mut self, b: Resource<Bucket>, key: String) -> Result<(), store::Error> {
        Ok(self.kv(&b, super::Op::Delete(key)).await.map(drop)?)
    }

    async fn exists(&mut self, b: Resource<Bucket>, key: String) -> Result<bool, store::Error> {
        Ok(self.kv_exists(&b, key).await?)
    }

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, store::Error> {
        let (keys, cursor) = self.kv_list(&b, cursor.unwrap_or(0)).await?;
        Ok(store::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        self.kv_closed();
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
        let n = self.kv_increment(&b, key, Delta::Unsigned(delta)).await?;
        u64::try_from(n).map_err(|_| store::Error::Other(format!("the counter is {n}, not a u64")))
    }
}

/// The generated functions take lists the host has already copied out of
/// the guest; [`add_to_linker`] replaces them with ones that read the lists
/// an entry at a time. These stay for the trait.
impl batch::Host for State {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Answer, store::Error> {
        Ok(answer(self.kv_get_many(&b, keys).await?))
    }

    async fn set_many(
        &mut self,
        b: Resource<Bucket>,
        pairs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), store::Error> {
        Ok(self.kv(&b, super::Op::SetMany(pairs)).await.map(drop)?)
    }

    async fn delete_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), store::Error> {
        Ok(self.kv(&b, super::Op::DeleteMany(keys)).await.map(drop)?)
    }
}

/// `store`, `atomics` and `batch` of this version are linked with the
/// `wasmgate:edge` worlds (every world imports them); this replaces the
/// batch functions with ones reading the guest's lists lazily.
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    super::link_lazy_batch::<store::Error, Answer>(
        linker,
        "wasi:keyvalue/batch@0.2.0-draft",
        answer,
    )
}
