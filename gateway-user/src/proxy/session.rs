//! Live sessions: ids, the table `portcullis flows` lists, and the cancel
//! handles used to end sessions whose access is gone.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use super::FlowInfo;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Live {
    info: FlowInfo,
    cancel: CancellationToken,
}

/// The table of live sessions.
pub struct Sessions {
    prefix: String,
    next: AtomicU64,
    /// Boxed entries: a hash table keeps up to twice as many buckets as
    /// entries, and an empty bucket of a session's size would be some
    /// 400 bytes.
    live: Arc<Mutex<HashMap<String, Box<Live>>>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Sessions {
    /// An empty table whose ids are unique across daemon restarts.
    pub fn new() -> Self {
        Self {
            prefix: format!("{:x}", now_ms()),
            next: AtomicU64::new(1),
            live: Arc::default(),
        }
    }

    /// A fresh session id.
    pub fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Adds a session; it leaves the table when the guard drops.
    pub fn register(&self, info: FlowInfo, cancel: CancellationToken) -> SessionGuard {
        let id = info.session.clone();
        self.lock()
            .insert(id.clone(), Box::new(Live { info, cancel }));
        SessionGuard {
            id,
            live: self.live.clone(),
        }
    }

    /// Changes a live session's info (e.g. the grant it now relies on).
    pub fn update(&self, id: &str, f: impl FnOnce(&mut FlowInfo)) {
        if let Some(l) = self.lock().get_mut(id) {
            f(&mut l.info);
        }
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<FlowInfo> {
        let mut v: Vec<FlowInfo> = self.lock().values().map(|l| l.info.clone()).collect();
        v.sort_by(|a, b| {
            a.started_ms
                .cmp(&b.started_ms)
                .then(a.session.cmp(&b.session))
        });
        v
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every session for which `pred` holds; returns their ids.
    pub fn cancel_where(&self, mut pred: impl FnMut(&FlowInfo) -> bool) -> Vec<String> {
        self.lock()
            .values()
            .filter(|l| pred(&l.info))
            .map(|l| {
                l.cancel.cancel();
                l.info.session.clone()
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Box<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes its session from the table when dropped.
pub struct SessionGuard {
    id: String,
    live: Arc<Mutex<HashMap<String, Box<Live>>>>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}
