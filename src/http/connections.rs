//! The accept loop of the API (and of a worker's metrics listener): hyper's HTTP/1 server,
//! with what `axum::serve` lacks against slow and idle clients.
//!
//! - A header read timeout: a client has `header_read_timeout` to send a request's headers,
//!   from the connection's start or the end of its previous response, or it is closed.
//! - A cap on open connections, below the file limit, so that `accept` never fails for want
//!   of descriptors. From seven eighths of the cap on, each new connection closes the one
//!   that has waited longest for a request (nothing in flight); with none waiting, the new
//!   one is closed at once. At the cap itself, while connections told to close are still
//!   closing, new ones wait in the listen backlog, which holds no descriptor. A slowloris
//!   thus cannot keep a prompt client out, nor take the process's descriptors.
//! - Graceful shutdown: once `shutdown` resolves nothing more is accepted, each connection
//!   ends after the response in flight (an event stream after its last event), and the
//!   loop returns when all have.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// What the loop enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the open connections
/// finish their responses and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let registry = Arc::new(Registry::new(limits.max_connections));
    let (stopping, stop) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = async {
                registry.room().await;
                listener.accept().await
            } => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // The cap keeps descriptors free, but another part of the process may
                    // have taken them: wait a moment rather than spin.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (slot, evicted) = match registry.admit() {
            Admission::Refused => {
                tracing::debug!("connection refused: at the cap, or none waiting");
                drop(stream);
                continue;
            }
            Admission::Admitted { slot, evicted } => (slot, evicted),
        };
        if evicted {
            // Let the connection told to close do so before more are accepted.
            tokio::task::yield_now().await;
        }
        let _ = stream.set_nodelay(true);
        let slot = Arc::new(slot);
        let service = {
            let slot = slot.clone();
            let router = router.clone();
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let busy = Busy::start(slot.clone());
                let router = router.clone();
                async move {
                    let response = router.oneshot(request.map(Body::new)).await;
                    response.map(|response| response.map(|body| Body::new(busy.until(body))))
                }
            })
        };
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let mut stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut stopping = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(error) = served {
                            tracing::debug!(%error, "connection ended");
                        }
                        break;
                    }
                    () = slot.evicted.notified() => {
                        tracing::debug!("connection closed for a newer one: at the cap");
                        break;
                    }
                    _ = stop.wait_for(|stop| *stop), if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
}

/// The open connections, and those among them waiting for a request, oldest first.
struct Registry {
    max: usize,
    /// From this many open on, a new connection closes the one waiting longest.
    crowded: usize,
    state: Mutex<RegistryState>,
    /// Told whenever a connection closes.
    closed: Notify,
}

enum Admission {
    Admitted { slot: Slot, evicted: bool },
    Refused,
}

#[derive(Default)]
struct RegistryState {
    /// Connections whose socket is open, those told to close included.
    open: usize,
    /// Connections told to close that have not yet.
    closing: usize,
    /// Waiting connections by when they started waiting, so the first has waited longest.
    waiting: BTreeMap<u64, u64>,
    connections: HashMap<u64, Connection>,
    next_key: u64,
}

struct Connection {
    /// Its key among the waiting, while it waits for a request.
    waiting_since: Option<u64>,
    /// Told to close for a newer connection: never waiting again.
    evicted: bool,
    close: Arc<Notify>,
}

impl Registry {
    fn new(max: usize) -> Registry {
        let max = max.max(1);
        Registry {
            max,
            crowded: max - max / 8,
            state: Mutex::new(RegistryState::default()),
            closed: Notify::new(),
        }
    }

    /// Returns when a connection may be accepted: at once, unless the cap is reached while
    /// connections told to close are still closing (then when one has).
    async fn room(&self) {
        loop {
            let closed = self.closed.notified();
            let mut closed = std::pin::pin!(closed);
            closed.as_mut().enable();
            {
                let state = self.lock();
                if state.open < self.max || state.closing == 0 {
                    return;
                }
            }
            closed.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        // Every change below keeps the state consistent before anything can panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection, when crowded only by telling the connection waiting
    /// longest to close; none at the cap.
    fn admit(self: &Arc<Self>) -> Admission {
        let mut state = self.lock();
        if state.open >= self.max {
            return Admission::Refused;
        }
        let mut evicted = false;
        if state.open >= self.crowded {
            let Some((_, oldest)) = state.waiting.pop_first() else {
                return Admission::Refused;
            };
            if let Some(connection) = state.connections.get_mut(&oldest) {
                connection.waiting_since = None;
                connection.evicted = true;
                connection.close.notify_one();
            }
            state.closing += 1;
            evicted = true;
        }
        state.open += 1;
        let id = state.key();
        let close = Arc::new(Notify::new());
        state.connections.insert(
            id,
            Connection {
                waiting_since: None,
                evicted: false,
                close: close.clone(),
            },
        );
        state.wait(id);
        drop(state);
        Admission::Admitted {
            slot: Slot {
                registry: self.clone(),
                id,
                evicted: close,
            },
            evicted,
        }
    }
}

impl RegistryState {
    fn key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    /// The connection starts waiting for a request, as the newest of the waiting.
    fn wait(&mut self, id: u64) {
        let key = self.key();
        if let Some(connection) = self.connections.get_mut(&id) {
            if !connection.evicted && connection.waiting_since.is_none() {
                connection.waiting_since = Some(key);
                self.waiting.insert(key, id);
            }
        }
    }
}

/// One open connection's place in the registry.
struct Slot {
    registry: Arc<Registry>,
    id: u64,
    /// Told when the connection is to close for a newer one.
    evicted: Arc<Notify>,
}

impl Slot {
    /// A request arrived: the connection is no longer one to close for a newer one.
    fn busy(&self) {
        let mut state = self.registry.lock();
        let since = state
            .connections
            .get_mut(&self.id)
            .and_then(|connection| connection.waiting_since.take());
        if let Some(key) = since {
            state.waiting.remove(&key);
        }
    }

    /// Its response has been sent: it waits for the next request.
    fn idle(&self) {
        self.registry.lock().wait(self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        if let Some(connection) = state.connections.remove(&self.id) {
            if let Some(key) = connection.waiting_since {
                state.waiting.remove(&key);
            }
            if connection.evicted {
                state.closing -= 1;
            }
            state.open -= 1;
            drop(state);
            self.registry.closed.notify_waiters();
        }
    }
}

/// A request in flight on a connection, until its response body has been sent (or dropped).
struct Busy(Arc<Slot>);

impl Busy {
    fn start(slot: Arc<Slot>) -> Busy {
        slot.busy();
        Busy(slot)
    }

    fn until(self, body: Body) -> TrackedBody {
        TrackedBody { body, _busy: self }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle();
    }
}

/// A response body that keeps its connection counted as busy while it is sent.
struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The file limit raised to its hard maximum (the soft limit is often 1024 while the hard
/// one is far higher), and the limit then in force, if it can be read.
pub fn raise_file_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        if let (Some(current), Some(maximum)) = (limit.current, limit.maximum) {
            if current < maximum {
                let raised = Rlimit {
                    current: Some(maximum),
                    maximum: Some(maximum),
                };
                match setrlimit(Resource::Nofile, raised) {
                    Ok(()) => return Some(maximum),
                    Err(error) => {
                        tracing::warn!(%error, current, maximum, "raising the file limit");
                    }
                }
            }
        }
        limit.current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Descriptors kept free of connections under the file limit: the database's files or
/// sockets, the listener, the runtime's own, a health check's fresh connection.
const RESERVED_FILES: u64 = 64;

/// The connections to allow: the configured cap, lowered to stay below the file limit.
pub fn connection_cap(configured: usize, file_limit: Option<u64>) -> usize {
    match file_limit {
        Some(limit) => {
            let room = limit.saturating_sub(RESERVED_FILES).max(1);
            configured.min(usize::try_from(room).unwrap_or(usize::MAX))
        }
        None => configured,
    }
    .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_file_limit() {
        assert_eq!(connection_cap(1024, Some(256)), 192);
        assert_eq!(connection_cap(100, Some(1 << 20)), 100);
        assert_eq!(connection_cap(1024, None), 1024);
        assert_eq!(connection_cap(1024, Some(10)), 1);
    }

    fn open(registry: &Registry) -> usize {
        registry.lock().open
    }

    fn admitted(admission: Admission) -> (Slot, bool) {
        match admission {
            Admission::Admitted { slot, evicted } => (slot, evicted),
            Admission::Refused => panic!("refused"),
        }
    }

    fn refused(admission: Admission) -> bool {
        matches!(admission, Admission::Refused)
    }

    #[tokio::test]
    async fn when_crowded_the_connection_waiting_longest_makes_room_and_a_busy_one_never_does() {
        // Crowded from 7 of 8 open on.
        let registry = Arc::new(Registry::new(8));
        let mut slots: Vec<Slot> = (0..7)
            .map(|_| {
                let (slot, evicted) = admitted(registry.admit());
                assert!(!evicted);
                slot
            })
            .collect();
        for slot in &slots[1..] {
            slot.busy();
        }

        // The first is the only one waiting: it is told to close, and counts until it has.
        let (eighth, evicted) = admitted(registry.admit());
        assert!(evicted);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), slots[0].evicted.notified())
                .await
                .is_ok()
        );
        assert_eq!(open(&registry), 8);
        // At the cap while the first is closing, the next waits for it.
        let room = tokio::time::timeout(Duration::from_millis(10), registry.room());
        assert!(room.await.is_err(), "room at the cap");
        let waiting = tokio::spawn({
            let registry = registry.clone();
            async move { registry.room().await }
        });
        drop(slots.remove(0));
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room once the first has closed")
            .unwrap();
        assert_eq!(open(&registry), 7);

        // Crowded, and the only waiting one is the eighth: it makes room.
        let (ninth, evicted) = admitted(registry.admit());
        assert!(evicted);
        drop(eighth);
        ninth.busy();
        // Crowded with none waiting: refused.
        assert!(refused(registry.admit()));

        // A connection back to waiting after its response can make room again.
        slots[0].idle();
        let (tenth, evicted) = admitted(registry.admit());
        assert!(evicted);
        drop(slots);
        drop(ninth);
        drop(tenth);
        assert_eq!(open(&registry), 0);
    }
}
