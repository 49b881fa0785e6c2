//! `hyper-relay LISTEN TARGET`: an HTTP relay built as the agent's request path is (as many
//! threads as the agent serves with by default, each with tokio's current-thread runtime
//! accepting from the shared listening socket; hyper's server on the client connection,
//! hyper's client on an upstream connection of its own, kept by the thread for its next
//! client connection when this one ends) and nothing else: no gate, attribution, policy,
//! token rules, shield or audit line.
//! Section 4 measures it beside the agent: the floor of the agent's HTTP machinery, apart
//! from what the agent does with each request.

use std::{cell::RefCell, net::SocketAddr, sync::Arc};

use hyper::{
    body::Incoming, client::conn::http1::SendRequest, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;

use super::{Result, clients::announce_listening};

pub(crate) fn hyper_relay(listen: SocketAddr, target: SocketAddr) -> Result {
    on_serving_threads(listen, target, relay)
}

/// Binds `listen` and serves it on as many threads as the agent serves with by default, each
/// with tokio's current-thread runtime accepting from its copy of the listening socket (as
/// the agent's threads share theirs) and running `relay` for each connection it accepts.
pub(crate) fn on_serving_threads<Relay, Relayed>(
    listen: SocketAddr,
    target: SocketAddr,
    relay: Relay,
) -> Result
where
    Relay: Fn(tokio::net::TcpStream, SocketAddr) -> Relayed + Copy + Send + 'static,
    Relayed: Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind(listen).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    // Inherited by every accepted socket, as the agent sets it.
    imds_agent::proxy::set_nodelay(&listener).map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let threads = imds_agent::cli::default_serve_threads();
    let serving: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().map_err(|e| e.to_string())?;
            Ok(std::thread::spawn(move || serve(listener, target, relay)))
        })
        .collect::<Result<_>>()?;
    announce_listening();
    for thread in serving {
        thread
            .join()
            .map_err(|_| "a serving thread panicked".to_owned())??;
    }
    Ok(())
}

/// One serving thread: accepts from its copy of the listening socket, and relays each
/// connection on its own runtime.
fn serve<Relay, Relayed>(
    listener: std::net::TcpListener,
    target: SocketAddr,
    relay: Relay,
) -> Result
where
    Relay: Fn(tokio::net::TcpStream, SocketAddr) -> Relayed,
    Relayed: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        loop {
            if let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target));
            }
        }
    })
}

/// One client connection through hyper's server, its requests sent on with hyper's client.
async fn relay(client: tokio::net::TcpStream, target: SocketAddr) {
    let Some(sender) = upstream(target).await else {
        return;
    };
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = service_fn({
        let sender = sender.clone();
        move |mut request: hyper::Request<Incoming>| {
            let sender = sender.clone();
            // Hop-by-hop, as a proxy treats it: a client's `Connection: close` sent on would
            // close the upstream connection kept for the next one.
            request.headers_mut().remove(hyper::header::CONNECTION);
            async move { sender.lock().await.send_request(request).await }
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
    // The service is gone with the connection: its upstream is ours again.
    if let Ok(sender) = Arc::try_unwrap(sender) {
        IDLE.with_borrow_mut(|idle| {
            if idle.len() < MAX_IDLE {
                idle.push(sender.into_inner());
            }
        });
    }
}

/// Idle upstream connections a thread keeps (the agent keeps up to 16 per caller).
const MAX_IDLE: usize = 32;

thread_local! {
    /// This thread's idle upstream connections, as the agent keeps its own per thread.
    static IDLE: RefCell<Vec<SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

/// An upstream connection: an idle one of this thread's that is still open, else a new one.
async fn upstream(target: SocketAddr) -> Option<SendRequest<Incoming>> {
    while let Some(mut idle) = IDLE.with_borrow_mut(Vec::pop) {
        if idle.ready().await.is_ok() {
            return Some(idle);
        }
    }
    let upstream = tokio::net::TcpStream::connect(target).await.ok()?;
    let _ = upstream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(upstream))
            .await
            .ok()?;
    tokio::spawn(connection);
    Some(sender)
}
