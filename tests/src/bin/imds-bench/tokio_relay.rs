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

use super::{Result, clients::announce_listening};

pub(crate) fn tokio_relay(listen: SocketAddr, target: SocketAddr) -> Result {
    let listener = std::net::TcpListener::bind(listen).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    imds_agent::proxy::set_nodelay(&listener).map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let threads = imds_agent::cli::default_serve_threads();
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
            });
        }
    })
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

fn content_length(head: &[u8]) -> Option<usize> {
    head.split(|b| *b == b'\n').find_map(|line| {
        let value = line
            .get(..15)
            .filter(|name| name.eq_ignore_ascii_case(b"content-length:"))
            .map(|_| &line[15..])?;
        std::str::from_utf8(value).ok()?.trim().parse().ok()
    })
}
