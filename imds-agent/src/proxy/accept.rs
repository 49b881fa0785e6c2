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

/// Accepts connections on every listener (loopback, and the node address for pods) until
/// `shutdown` resolves, then lets in-flight requests finish for at most `drain`.
pub async fn serve(
    listeners: Vec<TcpListener>,
    filter: Arc<Filter>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let max_connections = filter.callers.limits.config().max_connections;
    let connections = Arc::new(Semaphore::new(max_connections));
    let (draining, draining_seen) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut turn = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_any(&listeners, &mut turn) => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = connections.clone().try_acquire_owned() else {
                        filter.sinks.metrics.request("overload", "", "other", 503);
                        let answer = Answer::new(filter.provider, StatusCode::SERVICE_UNAVAILABLE, "imds-agent: overloaded, try again later\n".into());
                        tokio::spawn(refuse_connection(stream, peer, answer, "overload"));
                        continue;
                    };
                    let (filter, draining) = (filter.clone(), draining_seen.clone());
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
    tracing::info!("stopped accepting; draining in-flight requests");
    let _ = draining.send(true);
    // Every connection holds a slot until it ends: all slots back means all drained.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timed out; closing remaining connections");
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
            method: String::new(),
            target: String::new(),
            user_agent: String::new(),
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
