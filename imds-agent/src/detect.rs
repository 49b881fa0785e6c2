//! `--provider auto`: which cloud this is, found at start-up as cloud agents find it: each
//! provider's metadata service has a signature (a header it answers with, a path only it
//! serves, a token only it issues). All probes run at once with a short timeout; the first
//! match in a fixed order wins, so that EC2-compatible services (OpenStack) are told apart
//! from EC2 and GCP's header outranks a tree other clouds might mimic.
//!
//! The probes are the agent's own connections: an installation pinned by a previous agent
//! would divert them, so they are exempted through its pinned map.

use std::{net::SocketAddr, path::Path, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::provider::Provider;

/// Per probe: metadata services answer in a few milliseconds; an address nothing serves
/// must not hold up start-up.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// What identifies a provider's service.
struct Probe {
    provider: Provider,
    address: [u8; 4],
    request: &'static str,
    matches: fn(&Answer) -> bool,
}

/// A response head: status and headers (lower-case names).
pub struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

const EC2: [u8; 4] = [169, 254, 169, 254];

/// In the order they decide.
const PROBES: [Probe; 9] = [
    Probe {
        provider: Provider::Gcp,
        address: EC2,
        request: "GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n",
        matches: |a| a.header("metadata-flavor") == Some("Google"),
    },
    Probe {
        provider: Provider::Azure,
        address: EC2,
        request: "GET /metadata/versions HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200,
    },
    Probe {
        provider: Provider::Oci,
        address: EC2,
        request: "GET /opc/v2/instance/id HTTP/1.1\r\nHost: 169.254.169.254\r\nAuthorization: Bearer Oracle\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200,
    },
    Probe {
        provider: Provider::Digitalocean,
        address: EC2,
        request: "GET /metadata/v1/id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200,
    },
    Probe {
        provider: Provider::Hetzner,
        address: EC2,
        request: "GET /hetzner/v1/metadata/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200,
    },
    Probe {
        provider: Provider::Openstack,
        address: EC2,
        request: "GET /openstack HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200,
    },
    // EC2 issues session tokens (IMDSv2) whether or not it also serves IMDSv1.
    Probe {
        provider: Provider::Aws,
        address: EC2,
        request: "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200 && a.header("x-aws-ec2-metadata-token-ttl-seconds").is_some(),
    },
    // Alibaba's hardened mode: a session token is issued whether or not tokens are required
    // (a token-less GET would be refused where they are).
    Probe {
        provider: Provider::Alibaba,
        address: [100, 100, 100, 200],
        request: "PUT /latest/api/token HTTP/1.1\r\nHost: 100.100.100.200\r\nX-aliyun-ecs-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200,
    },
    // Volcengine's own address: any answer from its instance tree there is its service.
    Probe {
        provider: Provider::Volcengine,
        address: [100, 96, 0, 96],
        request: "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 100.96.0.96\r\nConnection: close\r\n\r\n",
        matches: |a| a.status == 200 || a.status == 401,
    },
];

/// The provider whose signature answers first in [`PROBES`] order, or `None` when none does
/// (no metadata service reachable).
pub async fn detect(pin_dir: &Path) -> Option<Provider> {
    let probes = PROBES.iter().map(|probe| async move {
        let answer = tokio::time::timeout(PROBE_TIMEOUT, ask(pin_dir, probe)).await;
        matches!(answer, Ok(Some(answer)) if (probe.matches)(&answer))
    });
    let results = futures::future::join_all(probes).await;
    PROBES
        .iter()
        .zip(results)
        .find(|(_, matched)| *matched)
        .map(|(probe, _)| probe.provider)
}

async fn ask(pin_dir: &Path, probe: &Probe) -> Option<Answer> {
    let addr = SocketAddr::from((probe.address, 80));
    let mut stream = crate::loader::connect_exempt_pinned(pin_dir, addr)
        .await
        .ok()?;
    stream.write_all(probe.request.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buffer).await.ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    parse_head(&String::from_utf8_lossy(&head))
}

fn parse_head(head: &str) -> Option<Answer> {
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    Some(Answer { status, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_read_from_response_heads() {
        let gcp = parse_head(
            "HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Length: 5\r\n\r\nbody",
        )
        .unwrap();
        assert!((PROBES[0].matches)(&gcp));
        let ec2 = parse_head("HTTP/1.1 200 OK\r\nX-Aws-Ec2-Metadata-Token-Ttl-Seconds: 60\r\n\r\n")
            .unwrap();
        assert!(!(PROBES[0].matches)(&ec2));
        let aws = PROBES.iter().find(|p| p.provider == Provider::Aws).unwrap();
        assert!((aws.matches)(&ec2));
        let forbidden = parse_head("HTTP/1.1 403 Forbidden\r\n\r\n").unwrap();
        assert!(!(aws.matches)(&forbidden));
        assert!(parse_head("garbage").is_none());
    }
}
