//! An attack helper: connects to ADDRESS:PORT with io_uring (IORING_OP_CONNECT, no connect(2)
//! syscall), sends `GET PATH` on the connected socket and prints the response, or the
//! connect's errno. Run inside the sandbox by the attack suite.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
};

use io_uring::{IoUring, opcode, types};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: uring-connect ADDRESS:PORT PATH");
        std::process::exit(64);
    };
    let addr: SocketAddr = addr.parse().expect("ADDRESS:PORT");
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    let connect = opcode::Connect::new(
        types::Fd(fd),
        (&sockaddr as *const libc::sockaddr_in).cast(),
        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
    .build();
    // SAFETY: sockaddr outlives the submission (we wait for its completion below).
    unsafe { ring.submission().push(&connect).expect("submission queue") };
    ring.submit_and_wait(1).expect("io_uring_enter");
    let result = ring.completion().next().expect("completion").result();
    if result < 0 {
        println!("connect: {}", std::io::Error::from_raw_os_error(-result));
        return;
    }
    // SAFETY: fd is a connected socket owned from here on.
    let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    print!("{response}");
}
