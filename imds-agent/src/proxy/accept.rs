//! The accept phase: the listeners, one task per client connection (admitted, then served
//! request by request through the gate), and draining on shutdown.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use http::{Response, StatusCode};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};

use super::{
    Body, Filter, admit,
    audit::{Exchange, next_request_id},
    gate::Gate,
    pipeline,
    refusal::{Answer, Refusal},
};

/// How long writing an answer to a connection hyper no longer serves may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// While draining, how long an idle keep-alive connection stays open for its client's next
/// request (answered with `Connection: close`) before it is closed. Closing idle connections
/// at once races with a client that is just sending on one (an SDK sends its next request
/// milliseconds after the last: botocore's credential fetch is three requests); a client that
/// pauses longer finds the connection closed before it reuses it, as after any idle timeout.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Serves connections on every listener (loopback, and the node address for pods) until
/// `shutdown` resolves, then lets in-flight requests finish for at most `drain`.
///
/// `threads` serving threads accept from every listener, each on a runtime of its own: a
/// connection is then served on the thread that accepted it, its upstream connections too,
/// so no request waits for another thread to wake, as with nginx's workers. They share the
/// listening sockets (each registers its own copy) rather than each having one of its own
/// (SO_REUSEPORT): a process of the agent's user could join such a group and be handed
/// connects diverted to the agent, and an upgrade hands over the same sockets whatever the
/// number of threads.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    threads: usize,
    filter: Arc<Filter>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServeError> {
    let max_connections = filter.callers.limits.config().max_connections;
    let connections = Arc::new(Semaphore::new(max_connections));
    let (draining, draining_seen) = watch::channel(false);
    let (stopping, stopping_seen) = watch::channel(false);
    // Accepted sockets inherit TCP_NODELAY from their listening socket: set once here (on
    // sockets bound now or handed over by a predecessor), not once per connection.
    let mut nodelay_inherited = true;
    for listener in &listeners {
        if let Err(error) = set_nodelay(listener) {
            tracing::warn!(%error, "cannot set TCP_NODELAY on a listening socket; setting it per connection");
            nodelay_inherited = false;
        }
    }
    let (ended, ended_seen) = tokio::sync::mpsc::unbounded_channel();
    let (accepting, mut accepting_seen) = tokio::sync::mpsc::channel(1);
    let mut serving = Vec::new();
    for number in 1..=threads.max(1) {
        let copies = match listeners
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect()
        {
            Ok(copies) => copies,
            Err(error) => {
                tracing::error!(%error, "cannot copy the listening sockets for a serving thread");
                break;
            }
        };
        let thread = ServingThread {
            number,
            filter: filter.clone(),
            connections: connections.clone(),
            draining: draining_seen.clone(),
            stopping: stopping_seen.clone(),
            nodelay_inherited,
            ended: ended.clone(),
            accepting: accepting.clone(),
        };
        match std::thread::Builder::new()
            .name(format!("imds-serve-{number}"))
            .spawn(move || thread.run(copies))
        {
            Ok(handle) => serving.push(handle),
            Err(error) => tracing::error!(%error, "cannot start a serving thread"),
        }
    }
    drop(accepting);
    if let Err(error) = until_shutdown(shutdown, ended_seen, serving.len()).await {
        // Nothing is served: connects wait in the backlog (nothing bypasses the agent) until
        // the agent exits and its service manager starts it again.
        drop(listeners);
        return Err(error);
    }
    tracing::info!("stopped accepting; draining in-flight requests");
    let _ = draining.send(true);
    // The threads close their copies; the sockets close with these (after a handover, the
    // successor holds them).
    drop(listeners);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, drained(&mut accepting_seen, &connections, all))
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timed out; closing remaining connections");
    }
    let _ = stopping.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for handle in serving {
            let _ = handle.join();
        }
    })
    .await;
    Ok(())
}

/// Why the agent no longer serves.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no serving thread is running ({started} started)")]
    NoServingThread { started: usize },
}

/// Waits for `shutdown`, or until none of the `started` serving threads is left: a thread that
/// ends before the agent drains (it could not start its runtime or register the listening
/// sockets, or it panicked) reports its number on `ended`. While one is left, the agent
/// serves with fewer threads.
async fn until_shutdown(
    shutdown: impl Future<Output = ()>,
    mut ended: tokio::sync::mpsc::UnboundedReceiver<usize>,
    started: usize,
) -> Result<(), ServeError> {
    let mut running = started;
    if running == 0 {
        return Err(ServeError::NoServingThread { started });
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            Some(number) = ended.recv() => {
                running -= 1;
                tracing::error!(thread = number, running, "a serving thread ended");
                if running == 0 {
                    return Err(ServeError::NoServingThread { started });
                }
            }
        }
    }
}

/// Returns once every serving thread has stopped accepting (each drops its `accepting`
/// sender) and then every connection has ended (each holds one of `all` slots until it ends).
///
/// In that order: waiting for the slots takes every slot that comes free, so a thread that
/// accepted a connection meanwhile (one already queued, or, during an upgrade, one the
/// successor would have taken from the same listening socket) found none left and refused it
/// as overload, a 503 to a caller of an agent that was not overloaded.
async fn drained(
    accepting: &mut tokio::sync::mpsc::Receiver<Infallible>,
    connections: &Semaphore,
    all: u32,
) {
    // `None` once every sender is gone; nothing is ever sent.
    let _ = accepting.recv().await;
    let _ = connections.acquire_many(all).await;
}

/// Reports a serving thread's end, however it ends (a panic included), to [`until_shutdown`].
struct EndReport {
    number: usize,
    ended: tokio::sync::mpsc::UnboundedSender<usize>,
}

impl Drop for EndReport {
    fn drop(&mut self) {
        let _ = self.ended.send(self.number);
    }
}

/// One serving thread: its runtime, and what its connections share with the others.
struct ServingThread {
    number: usize,
    filter: Arc<Filter>,
    connections: Arc<Semaphore>,
    draining: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    /// Whether accepted sockets come with TCP_NODELAY from their listening socket.
    nodelay_inherited: bool,
    /// Where the thread reports its end.
    ended: tokio::sync::mpsc::UnboundedSender<usize>,
    /// Held while the thread accepts (see [`drained`]).
    accepting: tokio::sync::mpsc::Sender<Infallible>,
}

impl ServingThread {
    fn run(self, listeners: Vec<std::net::TcpListener>) {
        // Made here, not where the thread is spawned: a thread that failed to spawn was never
        // counted as started, and must not be reported as ended.
        let _end_report = EndReport {
            number: self.number,
            ended: self.ended.clone(),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::audit::worker_idle)
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(%error, thread = self.number, "cannot start a serving thread's runtime");
                return;
            }
        };
        super::pool::use_shard(self.number);
        runtime.block_on(self.accept(listeners));
        // Connections still open after the drain end with the runtime.
        drop(runtime);
        crate::audit::thread_stopped();
    }

    /// Accepts until the agent drains, then serves what is open until it stops.
    async fn accept(mut self, listeners: Vec<std::net::TcpListener>) {
        // A thread that cannot serve every listener ends: serving some of them would leave
        // the others' callers (pods, on the node address) waiting unnoticed.
        let listeners: Vec<TcpListener> = match listeners
            .into_iter()
            .map(TcpListener::from_std)
            .collect()
        {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!(%error, thread = self.number, "cannot serve the listening sockets");
                return;
            }
        };
        let filter = &self.filter;
        tokio::spawn(keep_timers_quiet(filter.settings.shortest_timeout()));
        let mut draining = self.draining.clone();
        let drained = draining.wait_for(|d| *d);
        tokio::pin!(drained);
        let mut turn = 0;
        loop {
            tokio::select! {
                _ = &mut drained => break,
                accepted = accept_any(&listeners, &mut turn) => match accepted {
                    Ok((stream, peer)) => {
                        if !self.nodelay_inherited {
                            let _ = stream.set_nodelay(true);
                        }
                        let Ok(slot) = self.connections.clone().try_acquire_owned() else {
                            filter.sinks.metrics.request("overload", "", "other", 503);
                            let answer = Answer::new(filter.provider, StatusCode::SERVICE_UNAVAILABLE, "imds-agent: overloaded, try again later\n".into());
                            tokio::spawn(refuse_connection(stream, peer, answer, "overload"));
                            continue;
                        };
                        let (filter, draining) = (filter.clone(), self.draining.clone());
                        tokio::spawn(async move {
                            serve_connection(filter, stream, peer, draining).await;
                            drop(slot);
                        });
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listeners);
        drop(self.accepting);
        let _ = self.stopping.wait_for(|s| *s).await;
    }
}

/// Sets TCP_NODELAY on a listening socket, for the sockets it accepts. An answer's head and
/// body can leave in two writes (a body still on its way from upstream): without it, the second
/// waits for the client's delayed ACK, 40 ms.
pub fn set_nodelay(listener: &std::net::TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// A timer on the serving thread that is always due within `period` (the shortest timeout its
/// requests arm). tokio wakes a runtime's own driver (an eventfd write, then one more
/// epoll_wait) whenever a timer is armed that is due before the one the driver last slept
/// for: without this, a thread idle between requests slept for a connection's idle timeout,
/// and each request's head and upstream timeouts woke it again once they were armed. Costs one
/// wake-up per `period` on an idle thread.
async fn keep_timers_quiet(period: Duration) {
    // Shorter timeouts than this may wake the driver: spinning would cost more.
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// The next connection from whichever listener has one; the listener asked first rotates,
/// so that a busy one cannot starve the others.
async fn accept_any(
    listeners: &[TcpListener],
    turn: &mut usize,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    *turn = turn.wrapping_add(1);
    let first = *turn;
    std::future::poll_fn(|cx| {
        for i in 0..listeners.len() {
            let listener = &listeners[(first + i) % listeners.len()];
            if let std::task::Poll::Ready(accepted) = listener.poll_accept(cx) {
                return std::task::Poll::Ready(accepted);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

type Answered = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// One client connection: admitted, then its requests served until it ends, the agent drains,
/// or the gate refuses a head (answered after the requests before it, then closed).
async fn serve_connection(
    filter: Arc<Filter>,
    stream: TcpStream,
    peer: SocketAddr,
    mut draining: watch::Receiver<bool>,
) {
    let Some(connection) = admit::admit(&filter, &stream, peer).await else {
        filter.sinks.metrics.request("refuse", "", "other", 403);
        let answer = Answer::new(
            filter.provider,
            StatusCode::FORBIDDEN,
            "imds-agent: refused: this connection was not diverted by the kernel\n".into(),
        );
        refuse_connection(stream, peer, answer, "not-diverted").await;
        return;
    };
    let connection = Arc::new(connection);
    let service = {
        let (filter, connection) = (filter.clone(), connection.clone());
        service_fn(move |request| {
            let (filter, connection) = (filter.clone(), connection.clone());
            // Boxed: hyper hands the stream back (to answer a refused head) only to a
            // service whose future can move.
            Box::pin(async move {
                let mut response = pipeline::handle(&filter, &connection, request).await;
                if connection
                    .draining
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    // hyper closes the connection after this response.
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response)
            }) as Answered
        })
    };
    // Every request head passes the strict gate before hyper sees it; the gate enforces the
    // head and idle timeouts. half_close: once the gate ends the stream, hyper still answers
    // the requests in hand.
    let gated = Gate::new(stream, filter.settings.timeouts);
    let mut conn = http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(gated), service);
    let (mut drain_started, mut closing) = (false, false);
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let served = loop {
        tokio::select! {
            served = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break served,
            _ = draining.wait_for(|d| *d), if !drain_started => {
                drain_started = true;
                connection.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                grace.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            () = &mut grace, if drain_started && !closing => {
                closing = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if let Err(error) = &served {
        tracing::debug!(%peer, %error, "client connection ended with an error");
    }
    let mut gate = conn.into_parts().io.into_inner();
    if let (Ok(()), Some(violation)) = (&served, gate.violation()) {
        // The client's method and path are unknown (the head was malformed): the audit line
        // has neither.
        let exchange = Exchange {
            filter: &filter,
            connection: &connection,
            method: "",
            target: "",
            user_agent: "",
            request_id: next_request_id(),
            started: std::time::Instant::now(),
            tokenless: false,
        };
        let refusal = Refusal::Malformed(violation);
        pipeline::record_refusal(&exchange, &refusal);
        let bytes = refusal
            .answer(filter.provider, &exchange.request_id)
            .into_bytes();
        let _ = tokio::time::timeout(WRITE_TIMEOUT, gate.write_all(&bytes)).await;
    }
    let _ = gate.shutdown().await;
}

/// Answers a connection with a fixed response, without reading it, and closes it.
async fn refuse_connection(mut stream: TcpStream, peer: SocketAddr, answer: Answer, reason: &str) {
    tracing::info!(
        target: crate::audit::TARGET,
        %peer,
        decision = "refuse",
        reason,
        "connection refused"
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&answer.into_bytes())).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that reports its end as a serving thread does, after `body`.
    fn thread_reporting_its_end(
        number: usize,
        ended: &tokio::sync::mpsc::UnboundedSender<usize>,
        body: impl FnOnce() + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let ended = ended.clone();
        std::thread::spawn(move || {
            let _end_report = EndReport { number, ended };
            body();
        })
    }

    #[tokio::test]
    async fn serving_stops_with_an_error_once_no_serving_thread_is_left() {
        let (ended, ended_seen) = tokio::sync::mpsc::unbounded_channel();
        let threads = [
            thread_reporting_its_end(1, &ended, || {}),
            thread_reporting_its_end(2, &ended, || panic!("a serving thread's bug")),
        ];
        let never = std::future::pending();
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            until_shutdown(never, ended_seen, threads.len()),
        )
        .await
        .expect("an error, not a wait for a shutdown that never comes");
        assert!(matches!(
            served,
            Err(ServeError::NoServingThread { started: 2 })
        ));
        assert!(
            threads.into_iter().any(|t| t.join().is_err()),
            "one panicked"
        );
    }

    #[tokio::test]
    async fn serving_goes_on_while_one_serving_thread_is_left() {
        let (ended, ended_seen) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let ended_early = thread_reporting_its_end(1, &ended, || {});
        let serving = thread_reporting_its_end(2, &ended, move || {
            let _ = released.recv();
        });
        ended_early.join().expect("thread 1");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let waiting = tokio::spawn(until_shutdown(
            async {
                let _ = stopped.await;
            },
            ended_seen,
            2,
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "still serving with thread 2");
        stop.send(()).expect("waiting");
        assert!(waiting.await.expect("joined").is_ok());
        release.send(()).expect("thread 2 waits");
        serving.join().expect("thread 2");
    }

    #[tokio::test]
    async fn serving_without_any_serving_thread_is_an_error_at_once() {
        let (_ended, ended_seen) = tokio::sync::mpsc::unbounded_channel();
        let served = until_shutdown(std::future::pending(), ended_seen, 0).await;
        assert!(matches!(
            served,
            Err(ServeError::NoServingThread { started: 0 })
        ));
    }

    #[tokio::test]
    async fn a_connection_accepted_as_the_drain_begins_gets_a_slot() {
        let connections = Arc::new(Semaphore::new(3));
        let open = connections.clone().try_acquire_owned().expect("a slot");
        let (accepting, mut accepting_seen) = tokio::sync::mpsc::channel(1);
        let drain = {
            let connections = connections.clone();
            tokio::spawn(async move { drained(&mut accepting_seen, &connections, 3).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A serving thread that has not yet seen the drain accepts one more connection.
        let slot = connections
            .clone()
            .try_acquire_owned()
            .expect("a slot: the agent is draining, not overloaded");
        drop(accepting);
        drop(open);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !drain.is_finished(),
            "the connection accepted last is still open"
        );
        drop(slot);
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("drained once it ends")
            .expect("joined");
    }

    /// What serving relies on to skip a setsockopt per connection.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_their_listening_socket() {
        let accepted_nodelay = |set: bool| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            if set {
                set_nodelay(&listener).expect("TCP_NODELAY");
            }
            let _client = std::net::TcpStream::connect(listener.local_addr().expect("address"))
                .expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            accepted.nodelay().expect("getsockopt")
        };
        assert!(accepted_nodelay(true));
        assert!(
            !accepted_nodelay(false),
            "the kernel's default, for the check above to mean anything"
        );
    }
}
