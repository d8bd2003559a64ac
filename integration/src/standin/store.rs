//! The objects, one global resourceVersion counter, and the history of changes that watches read from.
//!
//! Writes are compare-and-swap on the resourceVersion the writer read (as etcd's are), so a request that must
//! await something between reading and writing (an admission webhook) holds no lock while it waits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::Value;

/// Namespace ("" for cluster-scoped) and name.
pub type Key = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One write, as watches see it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub storage: &'static str,
    pub namespace: String,
    pub kind: ChangeType,
    pub object: Arc<Value>,
    /// The object before this change (MODIFIED only), so a filtered watch can tell an object entering its
    /// selection from one leaving it.
    pub previous: Option<Arc<Value>>,
    /// `object` serialized once for all watchers.
    pub object_json: Bytes,
}

/// Why a write did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteError {
    NotFound,
    AlreadyExists,
    /// The stored object's resourceVersion is not the one the writer read.
    Stale,
}

/// A watch asked for changes older than the history kept.
#[derive(Debug)]
pub struct Gone {
    pub oldest: u64,
}

struct Inner {
    rv: u64,
    objects: HashMap<&'static str, BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    /// Changes at or below this resourceVersion have been dropped from `history`.
    trimmed_to: u64,
}

pub struct Store {
    inner: Mutex<Inner>,
    history_limit: usize,
    latest: tokio::sync::watch::Sender<u64>,
}

pub fn resource_version(obj: &Value) -> Option<u64> {
    obj.pointer("/metadata/resourceVersion")?
        .as_str()?
        .parse()
        .ok()
}

fn set_resource_version(obj: &mut Value, rv: u64) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        Store {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                trimmed_to: 1,
            }),
            history_limit: history_limit.max(1),
            latest: tokio::sync::watch::channel(1).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves maps that are still consistent (every write is one insert).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resourceVersion of the latest write; woken on every write.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.latest.subscribe()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, storage: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        let inner = self.lock();
        inner
            .objects
            .get(storage)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// All objects of `storage` (in `ns` if given), ordered by namespace and name, and the resourceVersion the
    /// list is consistent at.
    pub fn list(&self, storage: &str, ns: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let items = match inner.objects.get(storage) {
            None => Vec::new(),
            Some(m) => match ns {
                None => m.values().cloned().collect(),
                Some(ns) => m
                    .range((ns.to_string(), String::new())..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, v)| v.clone())
                    .collect(),
            },
        };
        (items, inner.rv)
    }

    fn record(
        &self,
        inner: &mut Inner,
        storage: &'static str,
        ns: &str,
        kind: ChangeType,
        object: Arc<Value>,
        previous: Option<Arc<Value>>,
    ) {
        let object_json =
            Bytes::from(serde_json::to_vec(&*object).expect("a JSON value serializes"));
        inner.history.push_back(Arc::new(Change {
            rv: inner.rv,
            storage,
            namespace: ns.to_string(),
            kind,
            object,
            previous,
            object_json,
        }));
        while inner.history.len() > self.history_limit {
            if let Some(c) = inner.history.pop_front() {
                inner.trimmed_to = c.rv;
            }
        }
    }

    fn publish(&self, rv: u64) {
        self.latest.send_replace(rv);
    }

    pub fn create(
        &self,
        storage: &'static str,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Arc<Value>, WriteError> {
        let mut inner = self.lock();
        let key = (ns.to_string(), name.to_string());
        if inner
            .objects
            .get(storage)
            .is_some_and(|m| m.contains_key(&key))
        {
            return Err(WriteError::AlreadyExists);
        }
        inner.rv += 1;
        set_resource_version(&mut obj, inner.rv);
        let obj = Arc::new(obj);
        inner
            .objects
            .entry(storage)
            .or_default()
            .insert(key, obj.clone());
        self.record(
            &mut inner,
            storage,
            ns,
            ChangeType::Added,
            obj.clone(),
            None,
        );
        let rv = inner.rv;
        drop(inner);
        self.publish(rv);
        Ok(obj)
    }

    /// Replaces the object if its stored resourceVersion is still `expected`.
    pub fn replace(
        &self,
        storage: &'static str,
        ns: &str,
        name: &str,
        expected: u64,
        mut obj: Value,
    ) -> Result<Arc<Value>, WriteError> {
        let mut inner = self.lock();
        let key = (ns.to_string(), name.to_string());
        let previous = inner
            .objects
            .get(storage)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or(WriteError::NotFound)?;
        if resource_version(&previous) != Some(expected) {
            return Err(WriteError::Stale);
        }
        inner.rv += 1;
        set_resource_version(&mut obj, inner.rv);
        let obj = Arc::new(obj);
        inner
            .objects
            .entry(storage)
            .or_default()
            .insert(key, obj.clone());
        self.record(
            &mut inner,
            storage,
            ns,
            ChangeType::Modified,
            obj.clone(),
            Some(previous),
        );
        let rv = inner.rv;
        drop(inner);
        self.publish(rv);
        Ok(obj)
    }

    /// Removes the object (if its resourceVersion is `expected`, when given); returns it as last seen, carrying
    /// the resourceVersion of the deletion as the DELETED event does.
    pub fn delete(
        &self,
        storage: &'static str,
        ns: &str,
        name: &str,
        expected: Option<u64>,
    ) -> Result<Arc<Value>, WriteError> {
        let mut inner = self.lock();
        let key = (ns.to_string(), name.to_string());
        let current = inner
            .objects
            .get(storage)
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or(WriteError::NotFound)?;
        if expected.is_some_and(|rv| resource_version(&current) != Some(rv)) {
            return Err(WriteError::Stale);
        }
        if let Some(m) = inner.objects.get_mut(storage) {
            m.remove(&key);
        }
        inner.rv += 1;
        let mut gone = (*current).clone();
        set_resource_version(&mut gone, inner.rv);
        let gone = Arc::new(gone);
        self.record(
            &mut inner,
            storage,
            ns,
            ChangeType::Deleted,
            gone.clone(),
            None,
        );
        let rv = inner.rv;
        drop(inner);
        self.publish(rv);
        Ok(gone)
    }

    /// Every change after `rv`, oldest first.
    pub fn changes_after(&self, rv: u64) -> Result<Vec<Arc<Change>>, Gone> {
        let inner = self.lock();
        if rv < inner.trimmed_to {
            return Err(Gone {
                oldest: inner.trimmed_to,
            });
        }
        let start = inner.history.partition_point(|c| c.rv <= rv);
        Ok(inner.history.range(start..).cloned().collect())
    }
}
