//! `hyper-relay LISTEN TARGET`: an HTTP relay built as the agent's request path is (tokio's
//! multi-thread runtime, hyper's server on the client connection, hyper's client on an
//! upstream connection of its own) and nothing else: no gate, attribution, policy, token
//! rules, shield or audit line. Section 4 measures it beside the agent: the floor of the
//! agent's HTTP machinery, apart from what the agent does with each request.

use std::{net::SocketAddr, sync::Arc};

use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

use super::{Result, clients::announce_listening};

pub(crate) fn hyper_relay(listen: SocketAddr, target: SocketAddr) -> Result {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| e.to_string())?;
        announce_listening();
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
