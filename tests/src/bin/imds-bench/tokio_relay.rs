//! `tokio-relay LISTEN TARGET`: the hyper relay's threads, runtimes and kept upstream
//! connections with no HTTP library: a request head is read up to its blank line and sent on
//! (its Connection header left out, so the upstream connection stays open), the answer read
//! to its Content-Length and written back whole. Only for section 4's requests (no bodies,
//! answers of a known length). Beside the hyper relay it shows what tokio and the kernel cost
//! apart from hyper.

use std::{cell::RefCell, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Result, clients::content_length};

pub(crate) fn tokio_relay(listen: SocketAddr, target: SocketAddr) -> Result {
    super::hyper_relay::on_serving_threads(listen, target, relay_connection)
}

/// One client connection, on an upstream connection of this thread's kept ones or a new one.
async fn relay_connection(client: TcpStream, target: SocketAddr) {
    let upstream = match IDLE.with_borrow_mut(Vec::pop) {
        Some(upstream) => upstream,
        None => {
            let Ok(upstream) = TcpStream::connect(target).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            upstream
        }
    };
    if let Some(upstream) = relay(client, upstream).await {
        IDLE.with_borrow_mut(|idle| {
            if idle.len() < MAX_IDLE {
                idle.push(upstream);
            }
        });
    }
}

const MAX_IDLE: usize = 32;

thread_local! {
    static IDLE: RefCell<Vec<TcpStream>> = const { RefCell::new(Vec::new()) };
}

/// Relays the client's requests until it closes or asks to; the upstream connection back
/// if it is still usable.
async fn relay(mut client: TcpStream, mut upstream: TcpStream) -> Option<TcpStream> {
    let mut request = Vec::with_capacity(1024);
    let mut answer = Vec::with_capacity(1024);
    loop {
        let Some(end) = read_head(&mut client, &mut request).await else {
            return Some(upstream);
        };
        let mut sent = Vec::with_capacity(end);
        let mut close = false;
        for line in request[..end - 2].split_inclusive(|b| *b == b'\n') {
            if line.len() > 11 && line[..11].eq_ignore_ascii_case(b"connection:") {
                close = line[11..].trim_ascii().eq_ignore_ascii_case(b"close");
            } else {
                sent.extend_from_slice(line);
            }
        }
        sent.extend_from_slice(b"\r\n");
        request.drain(..end);
        upstream.write_all(&sent).await.ok()?;
        answer.clear();
        let head = read_head(&mut upstream, &mut answer).await?;
        let length = content_length(&answer[..head])?;
        while answer.len() < head + length {
            if upstream.read_buf(&mut answer).await.ok()? == 0 {
                return None;
            }
        }
        client.write_all(&answer).await.ok()?;
        if close {
            let _ = client.shutdown().await;
            return Some(upstream);
        }
    }
}

/// Reads until `buffer` holds a whole head; where it ends. `None` at the end of the stream.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
}
