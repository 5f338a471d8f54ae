//! The embedded MQTT broker (`[mqtt] broker = "embedded"`): rmqtt running on
//! the host's tokio runtime, listening for the gateway's local devices; the
//! host's own MQTT client connects to it like any other client.
//!
//! It keeps sessions and queued messages in memory: persistent sessions
//! survive a client's reconnect but not a restart of the host. It sets
//! TCP_NODELAY, queues up to [`EmbeddedOptions::max_queued`] messages per
//! offline or slow session and lets queued messages live for a day.
//!
//! Clients are authenticated and authorized by the hooks here: users with
//! an Argon2id password hash and publish/subscribe topic filters, anonymous
//! clients only when allowed, and the gateway's own client, whose client id
//! is reserved and which authenticates with a secret made at start-up (so
//! no device can take over its session). Sessions are bounded in number
//! and in how long an offline one is kept.

use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;
use wasmgate_manifest::topic::TopicFilter;

/// Settings of the embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Address devices connect to.
    pub listen: SocketAddr,
    /// Messages queued per session before the broker drops the oldest.
    pub max_queued: usize,
    /// Largest packet accepted, in bytes.
    pub max_packet_size: u32,
    /// Sessions held at once (connected or offline).
    pub max_sessions: usize,
    /// Longest an offline session is kept.
    pub max_session_expiry: Duration,
    /// Whether clients without a username may connect (with access to
    /// every topic).
    pub allow_anonymous: bool,
    /// Clients with a username, password hash and topic filters.
    pub users: Vec<BrokerUser>,
    /// The client id the gateway's own client uses: reserved for it.
    pub gateway_client_id: String,
}

/// One `[[mqtt.embedded.users]]`.
#[derive(Debug, Clone)]
pub struct BrokerUser {
    /// The username.
    pub username: String,
    /// Its Argon2id hash (PHC string).
    pub password_hash: String,
    /// Topics it may publish to.
    pub publish: Vec<TopicFilter>,
    /// Topics it may subscribe to (a subscription must lie within one).
    pub subscribe: Vec<TopicFilter>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_queued: 10_000,
            max_packet_size: 1024 * 1024,
            max_sessions: 1024,
            max_session_expiry: Duration::from_secs(24 * 60 * 60),
            allow_anonymous: true,
            users: Vec::new(),
            gateway_client_id: "wasmgate".into(),
        }
    }
}

/// The username the gateway's own client connects with (a `$` name no
/// manifest user may have).
pub const GATEWAY_USERNAME: &str = "$wasmgate-gateway";

/// Password checks (Argon2id, ~19 MiB and tens of ms each) run at most this
/// many at once, so a flood of bad logins costs bounded memory and CPU.
const PASSWORD_CHECKS: usize = 2;

/// Hashes `password` for `[[mqtt.embedded.users]] password_hash`
/// (Argon2id, a random salt, PHC string).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no random numbers for the salt".to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A running embedded broker; dropping it stops it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    gateway_password: String,
}

impl EmbeddedBroker {
    /// Binds the listener and starts the broker. An address in use is an
    /// error naming it.
    pub async fn start(options: EmbeddedOptions) -> Result<Self, String> {
        for user in &options.users {
            argon2::PasswordHash::new(&user.password_hash).map_err(|e| {
                format!(
                    "mqtt.embedded.users: the password_hash of {:?} cannot be read ({e}); make one with `wasmgate hash-password`",
                    user.username
                )
            })?;
        }
        let scx = ServerContext::new()
            .mqtt_max_sessions(options.max_sessions as isize)
            .build()
            .await;
        let gateway_password = install_auth(&scx, &options).await?;
        let listener = Builder::new()
            .name("embedded/tcp")
            .laddr(options.listen)
            // A restart must get the port back while the connections the
            // host closed are still in TIME-WAIT on it.
            .reuseaddr(Some(true))
            .nodelay(true)
            .allow_anonymous(false)
            .max_handshaking_limit(64)
            .max_mqueue_len(options.max_queued)
            .max_packet_size(options.max_packet_size)
            .max_inflight(NonZeroU16::new(1024).expect("non-zero"))
            .message_expiry_interval(Duration::from_secs(24 * 60 * 60))
            .max_session_expiry_interval(options.max_session_expiry)
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
        tracing::info!(
            address = %addr,
            users = options.users.len(),
            anonymous = options.allow_anonymous,
            "embedded MQTT broker listening"
        );
        Ok(Self {
            addr,
            task,
            gateway_password,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The username and password the gateway's own client connects with.
    pub fn gateway_credentials(&self) -> (String, String) {
        (GATEWAY_USERNAME.to_string(), self.gateway_password.clone())
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registers the authentication and ACL hooks of `options` on the broker;
/// returns the secret the gateway's own client logs in with.
async fn install_auth(scx: &ServerContext, options: &EmbeddedOptions) -> Result<String, String> {
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| "no random numbers for the gateway's broker password".to_string())?;
    let gateway_password = hex::encode(secret);
    let rng = ring::rand::SystemRandom::new();
    let mac_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
        .map_err(|_| "no random numbers for the broker's MAC key".to_string())?;
    let auth = Arc::new(Auth {
        users: options.users.clone(),
        allow_anonymous: options.allow_anonymous,
        gateway_client_id: options.gateway_client_id.clone(),
        gateway_tag: ring::hmac::sign(&mac_key, gateway_password.as_bytes()),
        mac_key,
        checks: Arc::new(tokio::sync::Semaphore::new(PASSWORD_CHECKS)),
    });
    let register = scx.extends.hook_mgr().register();
    for typ in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
    ] {
        register.add(typ, Box::new(AuthHook(auth.clone()))).await;
    }
    register.start().await;
    Ok(gateway_password)
}

/// Who may connect, publish and subscribe.
struct Auth {
    users: Vec<BrokerUser>,
    allow_anonymous: bool,
    gateway_client_id: String,
    /// The MAC of the gateway's password under `mac_key`.
    gateway_tag: ring::hmac::Tag,
    mac_key: ring::hmac::Key,
    checks: Arc<tokio::sync::Semaphore>,
}

impl Auth {
    fn user(&self, name: &str) -> Option<&BrokerUser> {
        self.users.iter().find(|u| u.username == name)
    }

    /// The result of a CONNECT: the gateway's client is a superuser (no
    /// topic checks); users and anonymous clients are checked per topic.
    async fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> AuthResult {
        let is_gateway_id = client_id == self.gateway_client_id;
        if is_gateway_id || username == Some(GATEWAY_USERNAME) {
            // Compared as MACs under a key of this process: constant time.
            let secret_ok = password.is_some_and(|p| {
                ring::hmac::verify(&self.mac_key, p, self.gateway_tag.as_ref()).is_ok()
            });
            if is_gateway_id && username == Some(GATEWAY_USERNAME) && secret_ok {
                return AuthResult::Allow(true, None);
            }
            tracing::warn!(
                client_id,
                "embedded broker: refused a client using the gateway's reserved client id or username"
            );
            return AuthResult::NotAuthorized;
        }
        let Some(name) = username else {
            if self.allow_anonymous {
                return AuthResult::Allow(false, None);
            }
            tracing::info!(
                client_id,
                "embedded broker: refused an anonymous client (configure [[mqtt.embedded.users]] or allow_anonymous)"
            );
            return AuthResult::NotAuthorized;
        };
        let Some(user) = self.user(name) else {
            tracing::info!(
                client_id,
                username = name,
                "embedded broker: unknown username"
            );
            return AuthResult::BadUsernameOrPassword;
        };
        let Ok(_permit) = self.checks.clone().acquire_owned().await else {
            return AuthResult::NotAuthorized;
        };
        let hash = user.password_hash.clone();
        let password = password.unwrap_or_default().to_vec();
        let ok = tokio::task::spawn_blocking(move || {
            use argon2::password_hash::PasswordVerifier;
            argon2::PasswordHash::new(&hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(&password, &h)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        if ok {
            AuthResult::Allow(false, None)
        } else {
            tracing::info!(
                client_id,
                username = name,
                "embedded broker: wrong password"
            );
            AuthResult::BadUsernameOrPassword
        }
    }

    /// May the client (anonymous when `username` is `None`) publish to `topic`?
    fn may_publish(&self, username: Option<&str>, topic: &str) -> bool {
        match username {
            None => self.allow_anonymous,
            Some(name) => self
                .user(name)
                .is_some_and(|u| u.publish.iter().any(|f| f.matches(topic))),
        }
    }

    /// May the client subscribe to `filter` (a `$share/GROUP/` prefix is
    /// not part of the check)?
    fn may_subscribe(&self, username: Option<&str>, filter: &str) -> bool {
        let filter = strip_share(filter);
        match username {
            None => self.allow_anonymous,
            Some(name) => self
                .user(name)
                .is_some_and(|u| u.subscribe.iter().any(|g| filter_within(filter, &g.raw))),
        }
    }
}

/// `$share/GROUP/filter` → `filter`.
fn strip_share(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

/// Does every topic `filter` matches also match `granted`?
fn filter_within(filter: &str, granted: &str) -> bool {
    let mut f = filter.split('/');
    let mut g = granted.split('/');
    loop {
        match (f.next(), g.next()) {
            (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(fl), Some("+")) if fl != "#" => {}
            (Some(fl), Some(gl)) if fl == gl && fl != "+" && fl != "#" => {}
            _ => return false,
        }
    }
}

/// The rmqtt hooks, backed by [`Auth`].
struct AuthHook(Arc<Auth>);

#[async_trait]
impl Handler for AuthHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let password = info.password().map(|p| &p[..]);
                let username = info.username().map(|u| &u[..]);
                let result = self
                    .0
                    .authenticate(info.client_id(), username, password)
                    .await;
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let username = session.id.username.as_ref().map(|u| &u[..]);
                let result = if self.0.may_subscribe(username, &subscribe.topic_filter) {
                    SubscribeAclResult::new_success(subscribe.opts.qos(), None)
                } else {
                    tracing::info!(client_id = %session.id.client_id, filter = %subscribe.topic_filter, "embedded broker: subscription refused by the user's ACL");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let username = session.id.username.as_ref().map(|u| &u[..]);
                let result = if self.0.may_publish(username, &publish.topic) {
                    PublishAclResult::allow()
                } else {
                    tracing::info!(client_id = %session.id.client_id, topic = %publish.topic, "embedded broker: publish refused by the user's ACL");
                    PublishAclResult::rejected(false, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            _ => (true, acc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{filter_within, strip_share};

    #[test]
    fn subscriptions_must_lie_within_a_grant() {
        for (filter, granted, want) in [
            ("devices/7/cmd", "devices/7/#", true),
            ("devices/7/#", "devices/7/#", true),
            ("devices/7", "devices/7/#", true),
            ("devices/+/cmd", "devices/7/#", false),
            ("#", "devices/7/#", false),
            ("devices/7/cmd", "devices/+/cmd", true),
            ("devices/+/cmd", "devices/+/cmd", true),
            ("devices/#", "devices/+/cmd", false),
            ("devices/7/cmd/x", "devices/+/cmd", false),
            ("a/b", "#", true),
            ("a/b", "a/b", true),
            ("a/c", "a/b", false),
        ] {
            assert_eq!(
                filter_within(filter, granted),
                want,
                "{filter} within {granted}"
            );
        }
        assert_eq!(strip_share("$share/g/devices/#"), "devices/#");
        assert_eq!(strip_share("devices/#"), "devices/#");
    }
}
