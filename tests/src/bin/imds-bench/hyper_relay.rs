//! `hyper-relay LISTEN TARGET`: an HTTP relay built as the agent's request path is (one
//! thread per CPU, each with tokio's current-thread runtime accepting from the shared
//! listening socket; hyper's server on the client connection, hyper's client on an upstream
//! connection of its own) and nothing else: no gate, attribution, policy, token rules,
//! shield or audit line. Section 4 measures it beside the agent: the floor of the agent's
//! HTTP machinery, apart from what the agent does with each request.

use std::{net::SocketAddr, sync::Arc};

use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

use super::{Result, clients::announce_listening};

pub(crate) fn hyper_relay(listen: SocketAddr, target: SocketAddr) -> Result {
    let listener = std::net::TcpListener::bind(listen).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let serving: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().map_err(|e| e.to_string())?;
            Ok(std::thread::spawn(move || serve(listener, target)))
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

/// One serving thread: accepts from its copy of the listening socket, and serves each
/// connection on its own runtime.
fn serve(listener: std::net::TcpListener, target: SocketAddr) -> Result {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                let Ok((sender, connection)) =
                    hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(upstream))
                        .await
                else {
                    return;
                };
                tokio::spawn(connection);
                let sender = Arc::new(tokio::sync::Mutex::new(sender));
                let service = service_fn(move |request| {
                    let sender = sender.clone();
                    async move { sender.lock().await.send_request(request).await }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(client), service)
                    .await;
            });
        }
    })
}
