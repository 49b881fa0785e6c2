//! The measured clients and servers, run inside the sandbox as this binary again: std only,
//! so that nothing else in the process adds noise.

use super::*;

/// `connect ADDR N`: N times connect()+close(); prints "p50 p99 min max" in nanoseconds.
pub(crate) fn connect(addr: SocketAddr, n: usize) -> Result {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(timed_connect(addr)?);
    }
    let s = Stats::of(samples);
    println!("{} {} {} {}", s.p50, s.p99, s.min, s.max);
    Ok(())
}

/// One connect()+close() to `addr`, in nanoseconds.
pub(crate) fn timed_connect(addr: SocketAddr) -> Result<u64> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    // Close with RST (SO_LINGER 0): thousands of TIME_WAIT sockets to one destination
    // would make later connects slower and measure the port allocator, not the hooks.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
    Ok(start.elapsed().as_nanos() as u64)
}

/// `connect-ab ADDR N CGROUP_A CGROUP_B`: N connect()+close() from each of two cgroups
/// (absolute directories), alternating in batches of 50: the process moves itself between
/// them, so that both see the same machine at (nearly) the same time and the VM's drift,
/// which is larger than the effect measured, cancels. Prints "p50 p99" for A, then for B.
pub(crate) fn connect_ab(addr: SocketAddr, n: usize, cgroup_a: &Path, cgroup_b: &Path) -> Result {
    const BATCH: usize = 50;
    let cgroups = [cgroup_a.join("cgroup.procs"), cgroup_b.join("cgroup.procs")];
    let pid = std::process::id().to_string();
    let mut samples = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for batch in 0..n.div_ceil(BATCH) * 2 {
        let side = batch % 2;
        // A socket belongs to the cgroup of the process that creates it: from the move on,
        // every new socket runs that cgroup's programs (or none).
        std::fs::write(&cgroups[side], &pid)
            .map_err(|e| format!("{}: {e}", cgroups[side].display()))?;
        // The first connect after a move pays for cold caches; it is not what is measured.
        timed_connect(addr)?;
        for _ in 0..BATCH {
            samples[side].push(timed_connect(addr)?);
        }
    }
    let [a, b] = samples.map(Stats::of);
    println!("{} {} {} {}", a.p50, a.p99, b.p50, b.p99);
    Ok(())
}

pub(crate) fn get(stream: &mut TcpStream, path: &str, close: bool) -> std::io::Result<u16> {
    let connection = if close { "close" } else { "keep-alive" };
    // One write, no Nagle: a request split over small writes waits for a delayed ACK (40 ms).
    stream.set_nodelay(true)?;
    // GCP's server requires its flavour header.
    let flavour = if path.starts_with("/computeMetadata/") {
        "Metadata-Flavor: Google\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{flavour}Connection: {connection}\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    // Read the head, then Content-Length bytes.
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let status = std::str::from_utf8(head.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = content_length(&head).unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(status)
}

/// The Content-Length a response head names, if any.
pub(crate) fn content_length(head: &[u8]) -> Option<usize> {
    head.split(|b| *b == b'\n').find_map(|line| {
        let value = line
            .get(..15)
            .filter(|name| name.eq_ignore_ascii_case(b"content-length:"))
            .map(|_| &line[15..])?;
        std::str::from_utf8(value).ok()?.trim().parse().ok()
    })
}

/// `http ADDR PATH N CONCURRENCY keepalive|close`: N requests per worker; prints
/// "p50_ns p99_ns requests_per_second".
pub(crate) fn http(
    addr: SocketAddr,
    path: String,
    n: usize,
    workers: usize,
    close: bool,
) -> Result {
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || -> std::result::Result<Vec<u64>, String> {
                let mut samples = Vec::with_capacity(n);
                let mut stream = if close {
                    None
                } else {
                    Some(TcpStream::connect(addr).map_err(|e| e.to_string())?)
                };
                for _ in 0..n {
                    let start = Instant::now();
                    let status = match &mut stream {
                        Some(stream) => get(stream, &path, false),
                        None => TcpStream::connect(addr).and_then(|mut s| get(&mut s, &path, true)),
                    }
                    .map_err(|e| e.to_string())?;
                    if status != 200 {
                        return Err(format!("status {status}"));
                    }
                    samples.push(start.elapsed().as_nanos() as u64);
                }
                Ok(samples)
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.join().map_err(|_| "worker panicked")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rps = all.len() as f64 / elapsed;
    let s = Stats::of(all);
    println!("{} {} {rps:.0}", s.p50, s.p99);
    Ok(())
}

/// `sustained ADDR PATH SECONDS WORKERS`: keep-alive GETs for SECONDS from each worker, as an
/// SDK's HTTP client makes them: a request on a reused connection that fails before any
/// response (the server closed it) is sent again once on a new connection; anything else
/// that is not a 200 counts as failed. Prints "requests failed p50_ns p99_ns max_ns".
pub(crate) fn sustained(addr: SocketAddr, path: String, seconds: f64, workers: usize) -> Result {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let (mut samples, mut failed) = (Vec::new(), 0u64);
                let mut stream: Option<TcpStream> = None;
                while Instant::now() < until {
                    let start = Instant::now();
                    let reused = stream.is_some();
                    let attempt = |stream: &mut Option<TcpStream>| {
                        if stream.is_none() {
                            *stream = Some(TcpStream::connect(addr)?);
                        }
                        get(stream.as_mut().expect("connected"), &path, false)
                    };
                    let mut status = attempt(&mut stream);
                    if status.is_err() && reused {
                        stream = None;
                        status = attempt(&mut stream);
                    }
                    match status {
                        Ok(200) => samples.push(start.elapsed().as_nanos() as u64),
                        failure => {
                            // What failed, for whoever reads the bench's output. An error is
                            // always a new connection's: a reused one's is retried above.
                            let what = match failure {
                                Ok(status) => format!("status {status}"),
                                Err(error) => format!("{error} on a new connection"),
                            };
                            eprintln!("sustained: a request failed: {what}");
                            failed += 1;
                            stream = None;
                        }
                    }
                }
                (samples, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for handle in handles {
        let (samples, failures) = handle.join().map_err(|_| "worker panicked")?;
        all.extend(samples);
        failed += failures;
    }
    let requests = all.len() as u64 + failed;
    let s = Stats::of(if all.is_empty() { vec![0] } else { all });
    println!("{requests} {failed} {} {} {}", s.p50, s.p99, s.max);
    Ok(())
}

/// `flip ADDR PATH STATUS`: requests PATH (new connection each) until the status is STATUS;
/// prints the wall-clock time it was first seen, in nanoseconds since the epoch.
pub(crate) fn flip(addr: SocketAddr, path: &str, want: u16) -> Result {
    println!("ready");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        // A connect refused by a kernel verdict is the new policy in force as well.
        let status = match TcpStream::connect(addr).and_then(|mut s| get(&mut s, path, true)) {
            Ok(status) => status,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => want,
            Err(e) => return Err(e.to_string()),
        };
        if status == want {
            println!(
                "{}",
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            return Ok(());
        }
    }
    Err("the status never flipped".into())
}

/// Pins this process to one CPU when IMDS_BENCH_CPU says so: the packet-path client and
/// server on separate cores, so that the scheduler's placement is not what gets measured.
pub(crate) fn pin_to_cpu() {
    let Some(cpu) = std::env::var("IMDS_BENCH_CPU")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub(crate) fn announce_listening() {
    println!("listening");
    let _ = std::io::stdout().flush();
}

/// `serve ADDR`: the non-metadata server of the packet-path measurements. A connection that
/// starts with `B` is drained (bulk); one that starts with `R` gets each byte echoed back
/// (request/response).
pub(crate) fn serve(addr: SocketAddr) -> Result {
    pin_to_cpu();
    let listener = std::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
    announce_listening();
    for stream in listener.incoming() {
        let mut stream = stream.map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let mut kind = [0u8; 1];
            if stream.read_exact(&mut kind).is_err() {
                return;
            }
            if kind[0] == b'B' {
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
            } else {
                let _ = stream.set_nodelay(true);
                let mut byte = [0u8; 1];
                while stream.read_exact(&mut byte).is_ok() && stream.write_all(&byte).is_ok() {}
            }
        });
    }
    Ok(())
}

/// `relay LISTEN TARGET`: a bare TCP relay, the floor for any proxy: what one more loopback
/// hop costs with no parsing, policy or logging at all.
pub(crate) fn relay(listen: SocketAddr, target: SocketAddr) -> Result {
    let listener = std::net::TcpListener::bind(listen).map_err(|e| e.to_string())?;
    announce_listening();
    for client in listener.incoming() {
        let client = client.map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(target) else {
                return;
            };
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let (Ok(mut client_in), Ok(mut upstream_out)) =
                (client.try_clone(), upstream.try_clone())
            else {
                return;
            };
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut client_in, &mut upstream_out);
                let _ = upstream_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut upstream_in, mut client_out) = (upstream, client);
            let _ = std::io::copy(&mut upstream_in, &mut client_out);
            let _ = client_out.shutdown(std::net::Shutdown::Write);
            let _ = up.join();
        });
    }
    Ok(())
}

/// `bulk ADDR MIB`: sends MIB mebibytes on one connection; prints MiB/s.
pub(crate) fn bulk(addr: SocketAddr, mib: usize) -> Result {
    pin_to_cpu();
    let chunk = vec![0x5a_u8; 1 << 20];
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.write_all(b"B").map_err(|e| e.to_string())?;
    for _ in 0..mib {
        stream.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    // Done when the server has read everything: it closes after our FIN.
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let _ = stream.read(&mut [0u8; 1]);
    println!("{:.0}", mib as f64 / started.elapsed().as_secs_f64());
    Ok(())
}

/// `rr ADDR N`: N one-byte request/response round trips on one connection; prints round
/// trips per second.
pub(crate) fn rr(addr: SocketAddr, n: usize) -> Result {
    pin_to_cpu();
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream.write_all(b"R").map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut byte = [0u8; 1];
    for _ in 0..n {
        stream.write_all(b"x").map_err(|e| e.to_string())?;
        stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
    }
    println!("{:.0}", n as f64 / started.elapsed().as_secs_f64());
    Ok(())
}
