//! The `[mqtt] broker` address: `mqtt://`, `mqtts://` or `"embedded"`.

/// A parsed `mqtt://` or `mqtts://` broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or IP address.
    pub host: String,
    /// Port (default 1883, or 8883 with TLS).
    pub port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`; `"embedded"`
    /// gives `None`.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        if s == "embedded" {
            return Ok(None);
        }
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(format!(
                "{s:?} is not a broker URL: write \"mqtt://host:1883\", \"mqtts://host:8883\" or \"embedded\""
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{s:?}: only a host and port are allowed (credentials go in `username`/`password`)"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(format!("{s:?}: unterminated IPv6 address"));
            };
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = match port {
            None => {
                if tls {
                    8883
                } else {
                    1883
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("{s:?}: {p:?} is not a port (1-65535)")),
            },
        };
        Ok(Some(Self { tls, host, port }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let ok = |tls, host: &str, port| {
            Ok(Some(BrokerUrl {
                tls,
                host: host.into(),
                port,
            }))
        };
        for (url, want) in [
            ("mqtt://broker", ok(false, "broker", 1883)),
            ("mqtts://broker", ok(true, "broker", 8883)),
            ("mqtt://10.0.0.1:1884", ok(false, "10.0.0.1", 1884)),
            ("mqtts://b.example:443/", ok(true, "b.example", 443)),
            ("mqtt://[::1]:1883", ok(false, "::1", 1883)),
            ("mqtt://[::1]", ok(false, "::1", 1883)),
            ("embedded", Ok(None)),
        ] {
            assert_eq!(BrokerUrl::parse(url), want, "{url}");
        }
        for bad in [
            "tcp://broker",
            "broker:1883",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://b:0",
            "mqtt://b:70000",
            "mqtt://b:x",
            "mqtt://user:pw@b",
            "mqtt://b/topic",
            "mqtt://[::1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
