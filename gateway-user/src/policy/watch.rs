//! Hot reload: watches the policies directory and tells the daemon when to
//! load it again. Owns only change detection (with a short debounce); loading
//! and swapping the set is the daemon's business.
//!
//! The directory is watched, not the files, so editors' atomic renames and
//! Kubernetes ConfigMap `..data` symlink swaps are seen. Only create, modify,
//! rename and remove count: reacting to open/close events would loop forever
//! on the daemon's own reads.

use std::{path::Path, time::Duration};

use notify::{event::EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Debounce: a burst of events (an editor's write + rename, a ConfigMap
/// swap) becomes one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// A running watcher; dropping it stops watching.
pub struct PolicyWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching `dir`; each debounced change sends `()` on the returned
/// channel.
pub fn watch(dir: &Path) -> notify::Result<(PolicyWatcher, mpsc::Receiver<()>)> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if matches!(
                ev.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            ) && !matches!(
                ev.kind,
                EventKind::Modify(notify::event::ModifyKind::Metadata(_))
            ) {
                let _ = raw_tx.send(());
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Collect the rest of the burst.
            loop {
                match tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((PolicyWatcher { _watcher: watcher }, rx))
}
