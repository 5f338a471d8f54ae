//! The embedded MQTT broker (`[mqtt] broker = "embedded"`): rmqtt running on
//! the host's tokio runtime, listening for the gateway's local devices; the
//! host's own MQTT client connects to it like any other client.
//!
//! It keeps sessions and queued messages in memory: persistent sessions
//! survive a client's reconnect but not a restart of the host. It sets
//! TCP_NODELAY, queues up to [`EmbeddedOptions::max_queued`] messages per
//! offline or slow session and lets queued messages live for a day, so a
//! consumer that falls behind is not silently dropped at the defaults'
//! 1,000 messages / 5 minutes.

use rmqtt::context::ServerContext;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

/// Settings of the embedded broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Address devices connect to.
    pub listen: SocketAddr,
    /// Messages queued per session before the broker drops the oldest.
    pub max_queued: usize,
    /// Largest packet accepted, in bytes.
    pub max_packet_size: u32,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_queued: 100_000,
            max_packet_size: 1024 * 1024,
        }
    }
}

/// A running embedded broker; dropping it stops it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Binds the listener and starts the broker. An address in use is an
    /// error naming it.
    pub async fn start(options: EmbeddedOptions) -> Result<Self, String> {
        let scx = ServerContext::new().build().await;
        let listener = Builder::new()
            .name("embedded/tcp")
            .laddr(options.listen)
            .nodelay(true)
            .max_mqueue_len(options.max_queued)
            .max_packet_size(options.max_packet_size)
            .max_inflight(NonZeroU16::new(1024).expect("non-zero"))
            .message_expiry_interval(Duration::from_secs(24 * 60 * 60))
            .bind()
            .and_then(|l| l.tcp())
            .map_err(|e| {
                format!(
                    "mqtt.embedded.listen: cannot listen on {}: {e}",
                    options.listen
                )
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("mqtt.embedded.listen: {e}"))?;
        let task = tokio::spawn(async move {
            if let Err(e) = MqttServer::new(scx)
                .listener_by_id(listener, 1)
                .build()
                .run()
                .await
            {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        });
        tracing::info!(address = %addr, "embedded MQTT broker listening");
        Ok(Self { addr, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}
