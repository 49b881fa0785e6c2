//! GCP's metadata server over mutual TLS: where the node has its credentials (the guest agent
//! writes them to `/run/google-mds-mtls/`: `root.crt`, the server's root CA, and
//! `client.key`, the VM's client certificate and private key), the agent's upstream requests
//! to the metadata server go to `https://metadata.google.internal` (port 443 of its address)
//! with that certificate. The agent cannot sit inside a workload's own TLS session with the
//! server (that is the point of it); workloads talk plain HTTP to the agent, which is on the
//! node, and the agent talks mTLS to the server.
//!
//! Never a silent downgrade: credentials that exist but cannot be used make the request fail
//! (502, and the log says which file and why) rather than go out in the clear. The files are
//! read again when they change (the guest agent rotates them).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};

/// Where GCP's guest agent writes the credentials.
pub const DEFAULT_DIR: &str = "/run/google-mds-mtls";
const ROOT_CA: &str = "root.crt";
const CLIENT: &str = "client.key";
/// The name the metadata server's certificate is for.
pub const SERVER_NAME: &str = "metadata.google.internal";
/// The metadata server's mTLS port.
pub const PORT: u16 = 443;

#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct CredentialsError {
    path: PathBuf,
    reason: String,
}

/// The node's credentials for the metadata server, loaded when first needed and again when
/// either file changes. Asked on every request to the metadata server, so the files are looked
/// at (two stat calls) at most once per [`RECHECK`]; rotation is seen within it.
pub struct MdsTls {
    dir: PathBuf,
    loaded: Mutex<Option<Loaded>>,
}

/// How often the files are looked at.
const RECHECK: Duration = Duration::from_secs(1);

struct Loaded {
    checked: Instant,
    /// The files' modification times: what says they were rotated.
    stamp: Stamp,
    /// `None`: the node has no credentials.
    config: Option<Arc<ClientConfig>>,
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

impl MdsTls {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            loaded: Mutex::new(None),
        }
    }

    /// The TLS client configuration for the credentials as they are now; `None` where the
    /// node has none (neither file), and the metadata server is spoken to over plain HTTP.
    pub fn config(&self) -> Result<Option<Arc<ClientConfig>>, CredentialsError> {
        let mut loaded = self.loaded.lock().expect("mTLS lock");
        if let Some(known) = loaded.as_ref()
            && known.checked.elapsed() < RECHECK
        {
            return Ok(known.config.clone());
        }
        let (root, client) = (self.dir.join(ROOT_CA), self.dir.join(CLIENT));
        let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let stamp = (modified(&root), modified(&client));
        if let Some(known) = loaded.as_mut()
            && known.stamp == stamp
        {
            known.checked = Instant::now();
            return Ok(known.config.clone());
        }
        let config = if stamp == (None, None) {
            None
        } else {
            // Unusable credentials are not remembered: the next request looks again.
            let config = Arc::new(load(&root, &client)?);
            tracing::info!(dir = %self.dir.display(), "metadata server credentials loaded: upstream requests use mutual TLS");
            Some(config)
        };
        *loaded = Some(Loaded {
            checked: Instant::now(),
            stamp,
            config: config.clone(),
        });
        Ok(config)
    }

    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
    }
}

fn load(root: &Path, client: &Path) -> Result<ClientConfig, CredentialsError> {
    let error = |path: &Path, reason: String| CredentialsError {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(root)
        .and_then(Iterator::collect)
        .map_err(|e| error(root, e.to_string()))?;
    if ca.is_empty() {
        return Err(error(root, "no certificate".into()));
    }
    for certificate in ca {
        roots
            .add(certificate)
            .map_err(|e| error(root, e.to_string()))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(client)
        .and_then(Iterator::collect)
        .map_err(|e| error(client, e.to_string()))?;
    if chain.is_empty() {
        return Err(error(client, "no client certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(client).map_err(|e| error(client, e.to_string()))?;
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| error(client, e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| error(client, e.to_string()))
}
