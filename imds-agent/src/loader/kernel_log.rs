//! The kernel programs' own diagnostics (aya-log): written on their refusal paths only (a
//! refused connect, datagram or raw socket), never on the path of other connects; read from
//! their ring buffer and logged as events of target `imds_agent::kernel`.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;

/// The target of the kernel programs' log events.
pub const TARGET: &str = "imds_agent::kernel";

/// Hands the programs' records to tracing.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}

pub struct KernelLog {
    records: EbpfLogger<ToTracing>,
}

impl KernelLog {
    /// The programs' log buffer, taken from the loaded object before its programs run.
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, std::io::Error> {
        let records =
            EbpfLogger::init_with_logger(ebpf, ToTracing).map_err(std::io::Error::other)?;
        Ok(Self { records })
    }

    /// Logs the records as they come, for as long as the agent runs.
    pub async fn run(self) {
        // SAFETY: the logger owns the ring buffer's file descriptor, which stays open until the
        // logger is dropped (with the AsyncFd that owns it), and always returns that one.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.records, tokio::io::Interest::READABLE) };
        let mut records = match registered {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(error = %error, "the kernel programs' log is not read");
                return std::future::pending().await;
            }
        };
        loop {
            let Ok(mut ready) = records.readable_mut().await else {
                tracing::warn!("the kernel programs' log cannot be read any more");
                return std::future::pending().await;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}
