//! Addresses the config names: MQTT endpoints, HTTP proxies, socket addresses, and the TLS
//! files that go with them.

use super::*;

/// An HTTP proxy for the MQTT connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({}:{})", self.host, self.port)
    }
}

/// A section that reaches central over TLS: `ca_file`, `cert_file` and `key_file`, the same three
/// keys in `[central.mqtt]` and `[central.https]`.
///
/// The keys stay flat in each section rather than in a `#[serde(flatten)]` struct: serde
/// cannot combine `flatten` with `deny_unknown_fields`, and a typo must stay an error. This
/// trait is what the two sections share instead: path resolution, the file checks, and the
/// view the TLS client takes.
pub trait TlsSection {
    /// The config key of the section, `central.mqtt` or `central.https`.
    const SECTION: &'static str;
    fn tls_paths(&self) -> [&Option<PathBuf>; 3];
    fn tls_paths_mut(&mut self) -> [&mut Option<PathBuf>; 3];

    /// What [`crate::tls::client_config`] loads.
    fn tls_files(&self) -> crate::tls::TlsFiles<'_> {
        let [ca, cert, key] = self.tls_paths();
        crate::tls::TlsFiles {
            ca_file: ca.as_deref(),
            cert_file: cert.as_deref(),
            key_file: key.as_deref(),
        }
    }
}

macro_rules! tls_section {
    ($section:ty, $key:literal) => {
        impl TlsSection for $section {
            const SECTION: &'static str = $key;
            fn tls_paths(&self) -> [&Option<PathBuf>; 3] {
                [&self.ca_file, &self.cert_file, &self.key_file]
            }
            fn tls_paths_mut(&mut self) -> [&mut Option<PathBuf>; 3] {
                [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            }
        }
    };
}

tls_section!(MqttSection, "central.mqtt");
tls_section!(HttpsSection, "central.https");

impl ProxyUrl {
    /// `http://[user:pass@]host[:port][/]`. Only plain-HTTP CONNECT proxies: what stores run.
    pub fn parse(url: &str) -> Result<ProxyUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// (CONNECT) proxies are supported"))?;
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((auth, hp)) => (Some(auth), hp),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("proxy port {p:?} is not a number"))?,
            ),
            None => (hostport, 80),
        };
        if host.is_empty() || host.contains(['/', '?', '#']) {
            return Err(format!("{host:?} is not a proxy host name"));
        }
        let (username, password) = match auth.map(|a| a.split_once(':').unwrap_or((a, ""))) {
            Some((u, p)) => (Some(u.to_string()), Some(Secret::new(p))),
            None => (None, None),
        };
        Ok(ProxyUrl {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
            username,
            password,
        })
    }
}

/// Whether `NO_PROXY` (comma-separated host suffixes, or `*`) exempts `host`.
pub(super) fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        entry == "*"
            || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
    })
}

/// Parses `host:port` for a listener, with the port range checked so that `:70000` says so.
pub fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("{value:?} is not an address of the form host:port"));
    };
    let port: u64 = port
        .parse()
        .map_err(|_| format!("{value:?}: port {port:?} is not a number"))?;
    if port > 65535 {
        return Err(format!("port {port} is out of range 0-65535"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address (listeners bind to an IP)"))?;
    Ok(SocketAddr::new(ip, port as u16))
}

/// How the MQTT connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttScheme {
    /// `mqtt://`: plain TCP, default port 1883.
    Mqtt,
    /// `mqtts://`: TLS, default port 8883.
    Mqtts,
    /// `ws://`: WebSocket, default port 80.
    Ws,
    /// `wss://`: WebSocket over TLS, default port 443, for stores whose firewall passes only 443.
    Wss,
}

impl MqttScheme {
    pub fn tls(self) -> bool {
        matches!(self, MqttScheme::Mqtts | MqttScheme::Wss)
    }

    pub fn websocket(self) -> bool {
        matches!(self, MqttScheme::Ws | MqttScheme::Wss)
    }

    fn prefix(self) -> &'static str {
        match self {
            MqttScheme::Mqtt => "mqtt://",
            MqttScheme::Mqtts => "mqtts://",
            MqttScheme::Ws => "ws://",
            MqttScheme::Wss => "wss://",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            MqttScheme::Mqtt => 1883,
            MqttScheme::Mqtts => 8883,
            MqttScheme::Ws => 80,
            MqttScheme::Wss => 443,
        }
    }
}

/// Where the MQTT uplink connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub scheme: MqttScheme,
    pub host: String,
    pub port: u16,
    /// The WebSocket path (`/mqtt` unless the url names one); empty for TCP schemes.
    pub path: String,
}

impl MqttEndpoint {
    pub fn parse(url: &str) -> Result<MqttEndpoint, String> {
        let schemes = [
            MqttScheme::Mqtt,
            MqttScheme::Mqtts,
            MqttScheme::Ws,
            MqttScheme::Wss,
        ];
        let Some((scheme, rest)) = schemes
            .into_iter()
            .find_map(|s| url.strip_prefix(s.prefix()).map(|rest| (s, rest)))
        else {
            return Err(format!(
                "{url:?} must start with mqtt://, mqtts://, ws:// or wss://"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = if scheme.websocket() {
            if path.is_empty() || path == "/" {
                "/mqtt".to_string()
            } else {
                path.to_string()
            }
        } else {
            if !path.trim_end_matches('/').is_empty() {
                return Err(format!(
                    "{url:?}: a path ({path:?}) only makes sense for ws:// and wss://"
                ));
            }
            String::new()
        };
        // IPv6 literals are bracketed: [::1] or [::1]:1884.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("{url:?}: unclosed '[' in the host"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => scheme.default_port(),
            Some(port) => {
                let port: u64 = port
                    .parse()
                    .map_err(|_| format!("{url:?}: port {port:?} is not a number"))?;
                if port == 0 || port > 65535 {
                    return Err(format!("{url:?}: port {port} is out of range 1-65535"));
                }
                port as u16
            }
        };
        if host.is_empty() || host.contains(['/', '?', '#', '@', '[', ']']) {
            return Err(format!("{url:?}: {host:?} is not a host name"));
        }
        Ok(MqttEndpoint {
            scheme,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// `host:port`, with IPv6 literals bracketed.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The url as rumqttc's WebSocket transport wants it (scheme, authority and path).
    pub fn websocket_url(&self) -> String {
        format!("{}{}{}", self.scheme.prefix(), self.authority(), self.path)
    }
}

impl std::fmt::Display for MqttEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{}",
            self.scheme.prefix(),
            self.authority(),
            self.path
        )
    }
}
