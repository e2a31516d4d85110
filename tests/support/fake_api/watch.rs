//! Watch streams: newline-delimited JSON WatchEvents over a chunked 200 response, as the real
//! apiserver sends them. ADDED/MODIFIED/DELETED follow the history from the requested
//! resourceVersion (or start with synthetic ADDED events for what exists), objects moving in
//! or out of the selector become ADDED/DELETED, BOOKMARKs come on a timer when asked for, a
//! compacted resourceVersion is answered with an ERROR event carrying a 410 Status, and
//! `sendInitialEvents=true` ends its initial events with the `k8s.io/initial-events-end`
//! bookmark.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Shared;
use super::resources::ResourceDef;
use super::select::Selector;
use super::server::Body;
use super::status::ApiError;
use super::store::{ChangeKind, Store};

/// What a watch request asked for.
pub(crate) struct WatchRequest {
    pub def: &'static ResourceDef,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    pub send_initial_events: bool,
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("a JSON value serializes");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(def: &ResourceDef, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata}),
    )
}

impl WatchRequest {
    fn in_scope(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }

    /// The lines for every change after `cursor` that this watch sees, and the new cursor.
    fn pending(&self, store: &Store, cursor: u64) -> (Vec<Bytes>, u64) {
        let mut lines = Vec::new();
        for change in store.changes_since(cursor) {
            if change.bucket != self.def.bucket || !self.in_scope(&change.namespace) {
                continue;
            }
            let now = self.def.present(&change.object);
            let now_matches = self.selector.matches(&now);
            let before_matched = change
                .previous
                .as_ref()
                .is_some_and(|p| self.selector.matches(&self.def.present(p)));
            let kind = match change.kind {
                ChangeKind::Added if now_matches => "ADDED",
                ChangeKind::Deleted if before_matched || now_matches => "DELETED",
                ChangeKind::Modified => match (before_matched, now_matches) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => continue,
                },
                _ => continue,
            };
            lines.push(event_line(kind, &now));
        }
        (lines, store.resource_version())
    }

    /// Synthetic ADDED events for everything that matches now.
    fn initial(&self, store: &Store) -> Vec<Bytes> {
        store
            .objects(self.def.bucket)
            .iter()
            .filter(|o| {
                self.in_scope(
                    o.pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                )
            })
            .map(|o| self.def.present(o))
            .filter(|o| self.selector.matches(o))
            .map(|o| event_line("ADDED", &o))
            .collect()
    }
}

fn body_from(mut rx: mpsc::Receiver<Bytes>) -> Body {
    let frames = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|line| line.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    StreamBody::new(frames).boxed()
}

/// Starts a watch; the body streams until the timeout, `drop_watches`, a server stop, or the
/// client going away.
pub(crate) fn start(shared: &Arc<Shared>, req: WatchRequest) -> Result<Body, ApiError> {
    // Subscribe before reading the store so no write between the two goes unnoticed.
    let mut changes = shared.changes.subscribe();
    let mut drops = shared.drops.subscribe();
    changes.borrow_and_update();
    drops.borrow_and_update();

    let requested_rv = match req.resource_version.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?,
        ),
    };

    let (hang, interval, first, cursor, end_now) = {
        let state = shared.state.lock().expect("fake API state lock");
        let store = &state.store;
        let hang = state.hang_watches;
        let interval = state.bookmark_interval;
        match requested_rv {
            _ if hang => (true, interval, Vec::new(), 0, false),
            Some(rv) if store.is_too_old(rv) => {
                let status = ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    store.compacted_below()
                ));
                let line = event_line("ERROR", &status.to_status());
                (false, interval, vec![line], 0, true)
            }
            Some(rv) if rv != 0 && !req.send_initial_events => {
                let (lines, cursor) = req.pending(store, rv);
                (false, interval, lines, cursor, false)
            }
            _ => {
                let mut lines = req.initial(store);
                let cursor = store.resource_version();
                if req.send_initial_events && req.bookmarks {
                    lines.push(bookmark(req.def, cursor, true));
                }
                (false, interval, lines, cursor, false)
            }
        }
    };

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shared = Arc::clone(shared);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        struct Open(Arc<Shared>);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _open = Open(Arc::clone(&shared));

        if hang {
            // Half-open: headers went out, nothing else ever will.
            tokio::select! {
                _ = tx.closed() => {}
                _ = drops.changed() => {}
            }
            return;
        }
        for line in first {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if end_now {
            return;
        }
        let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut cursor = cursor;
        let mut bookmark_due = false;
        loop {
            let (lines, new_cursor) = {
                let state = shared.state.lock().expect("fake API state lock");
                req.pending(&state.store, cursor)
            };
            cursor = new_cursor;
            let events = !lines.is_empty();
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if events {
                let mut state = shared.state.lock().expect("fake API state lock");
                state.watch_events_sent.push(std::time::SystemTime::now());
            }
            if bookmark_due {
                bookmark_due = false;
                if tx.send(bookmark(req.def, cursor, false)).await.is_err() {
                    return;
                }
            }
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tx.closed() => return,
                _ = drops.changed() => return,
                _ = timeout => return,
                _ = ticker.tick(), if req.bookmarks => bookmark_due = true,
                _ = changes.changed() => {}
            }
        }
    });
    Ok(body_from(rx))
}
