//! A watch-fed map, the one that both the watch cache and the health watches are built on:
//! what `make` keeps of each object, by (namespace, name). A (re)list is gathered apart and
//! swapped in whole once complete, so a reader never sees half a list; `Rules` say which
//! events wake the owner.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use futures::StreamExt;
use kube::Resource;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_objects};
use tokio::sync::{Notify, watch};

/// An object's (namespace, name); the namespace is empty for a cluster-scoped object.
pub type Key = (String, String);

/// What is kept of each object.
pub type Map<V> = HashMap<Key, V>;

/// Which events wake the owner.
pub struct Rules<V> {
    /// Whether two versions of one object differ in what matters (a difference wakes).
    pub differ: fn(&V, &V) -> bool,
    /// Whether an object seen for the first time, after the first list, wakes.
    pub wake_on_new: bool,
    /// Whether the first complete list wakes.
    pub wake_on_first_list: bool,
}

/// One watch and the map it keeps.
pub struct Watched<V> {
    items: Arc<RwLock<Map<V>>>,
    ready: watch::Receiver<bool>,
}

fn key_of<K: Resource>(o: &K) -> Key {
    let meta = o.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Whether a complete list differs from what was kept before it.
fn relisted<V>(old: &Map<V>, new: &Map<V>, differ: fn(&V, &V) -> bool) -> bool {
    old.len() != new.len()
        || new
            .iter()
            .any(|(k, v)| old.get(k).is_none_or(|o| differ(o, v)))
}

impl<V: Send + Sync + 'static> Watched<V> {
    /// Starts the watch (a broken one is re-established with exponential backoff, and
    /// `broke` is told). `make` returns `None` for an object not to keep.
    pub fn start<K>(
        api: kube::Api<K>,
        config: watcher::Config,
        make: impl Fn(K) -> Option<V> + Send + 'static,
        rules: Rules<V>,
        changed: Arc<Notify>,
        broke: impl Fn(&watcher::Error) + Send + 'static,
    ) -> Watched<V>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let items: Arc<RwLock<Map<V>>> = Arc::default();
        let (ready_tx, ready) = watch::channel(false);
        let mut events = watch_objects(api, config).default_backoff().boxed();
        let store = items.clone();
        tokio::spawn(async move {
            let mut relist: Option<Map<V>> = None;
            while let Some(event) = events.next().await {
                let write = || store.write().unwrap_or_else(|e| e.into_inner());
                let moved = match event {
                    Ok(Event::Init) => {
                        relist = Some(Map::default());
                        false
                    }
                    Ok(Event::InitApply(o)) => {
                        let k = key_of(&o);
                        if let (Some(r), Some(v)) = (relist.as_mut(), make(o)) {
                            r.insert(k, v);
                        }
                        false
                    }
                    Ok(Event::InitDone) => {
                        let first = !*ready_tx.borrow();
                        let moved = relist.take().is_some_and(|new| {
                            let mut kept = write();
                            let moved = relisted(&kept, &new, rules.differ);
                            *kept = new;
                            moved
                        });
                        ready_tx.send_replace(true);
                        if first {
                            rules.wake_on_first_list
                        } else {
                            moved
                        }
                    }
                    Ok(Event::Apply(o)) => {
                        let k = key_of(&o);
                        let made = make(o);
                        let mut kept = write();
                        match made {
                            Some(v) => {
                                let moved = kept
                                    .get(&k)
                                    .map_or(rules.wake_on_new, |old| (rules.differ)(old, &v));
                                kept.insert(k, v);
                                moved
                            }
                            None => kept.remove(&k).is_some(),
                        }
                    }
                    Ok(Event::Delete(o)) => {
                        write().remove(&key_of(&o));
                        true
                    }
                    Err(e) => {
                        broke(&e);
                        false
                    }
                };
                if moved {
                    changed.notify_one();
                }
            }
        });
        Watched { items, ready }
    }
}

impl<V> Watched<V> {
    /// What is kept now.
    pub fn read(&self) -> RwLockReadGuard<'_, Map<V>> {
        self.items.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the watch has listed once.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the watch has listed once.
    pub async fn wait_ready(&self) {
        let mut r = self.ready.clone();
        let _ = r.wait_for(|ready| *ready).await;
    }
}
