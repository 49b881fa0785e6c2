//! The little of netlink the agent speaks (sock_diag, route): one socket per exchange,
//! requests with their header, and the replies and attributes in a datagram.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NLMSG_HDR: usize = 16;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub struct Socket(OwnedFd);

impl Socket {
    /// A netlink socket of `protocol` (NETLINK_ROUTE, NETLINK_SOCK_DIAG) talking to the kernel
    /// of the calling thread's network namespace.
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned here.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) of an initialised buffer.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn receive(&self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) into a buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A request to the kernel: the header (sequence 1, port id 0) and `payload`.
pub fn request(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + payload.len();
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&(len as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    message.extend_from_slice(payload);
    message
}

/// One message of a reply datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// The end of a dump.
    Done,
    /// An error message carrying errno 0: the request succeeded.
    Ack,
    Message {
        kind: u16,
        body: &'a [u8],
    },
}

/// The messages in one datagram. An error message other than an ack is an error, with the
/// kernel's errno; a truncated message is invalid data.
pub fn replies(mut data: &[u8]) -> io::Result<Vec<Reply<'_>>> {
    let mut replies = Vec::new();
    while data.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let body = &data[NLMSG_HDR..len];
        replies.push(match kind {
            NLMSG_DONE => Reply::Done,
            NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                Reply::Ack
            }
            kind => Reply::Message { kind, body },
        });
        data = data.get(align(len)..).unwrap_or_default();
    }
    Ok(replies)
}

/// The attributes (`rtattr`, `nlattr`: length, type, value) in `data`, as (type, value); stops
/// at the first malformed one.
pub fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        // Without the nested and byte-order flags (NLA_TYPE_MASK).
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = data.get(align(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

/// An attribute: length, type, value, padded to four bytes.
pub fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut attribute = Vec::with_capacity(align(len));
    attribute.extend_from_slice(&(len as u16).to_ne_bytes());
    attribute.extend_from_slice(&kind.to_ne_bytes());
    attribute.extend_from_slice(value);
    attribute.resize(align(len), 0);
    attribute
}

const fn align(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut data = attribute(4, &7u32.to_ne_bytes());
        data.extend(attribute(1, &[1, 2, 3]));
        data.extend(attribute(9, &[]));
        let parsed: Vec<_> = attributes(&data).collect();
        assert_eq!(
            parsed,
            [
                (4, &7u32.to_ne_bytes()[..]),
                (1, &[1u8, 2, 3][..]),
                (9, &[][..])
            ]
        );
        // A length past the end stops the walk.
        let mut bad = attribute(4, &7u32.to_ne_bytes());
        bad[0] = 200;
        assert_eq!(attributes(&bad).count(), 0);
    }

    #[test]
    fn an_error_reply_carries_the_kernels_errno_and_an_ack_does_not() {
        let error = |errno: i32| {
            let mut body = errno.to_ne_bytes().to_vec();
            body.extend_from_slice(&[0u8; NLMSG_HDR]);
            let mut message = request(NLMSG_ERROR, 0, &body);
            message.extend(request(NLMSG_DONE, 0, &[]));
            message
        };
        let failed = replies(&error(-libc::ENETUNREACH)).unwrap_err();
        assert_eq!(failed.raw_os_error(), Some(libc::ENETUNREACH));
        assert_eq!(replies(&error(0)).unwrap(), [Reply::Ack, Reply::Done]);
        let message = request(24, 0, &[1, 2, 3, 4]);
        assert_eq!(
            replies(&message).unwrap(),
            [Reply::Message {
                kind: 24,
                body: &[1, 2, 3, 4]
            }]
        );
        assert!(replies(&message[..message.len() - 1]).is_err());
    }
}
