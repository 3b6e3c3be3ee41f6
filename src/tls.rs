//! TLS client setup shared by both paths to central (MQTT and HTTPS): PEM files read once,
//! rustls with the ring provider, and failures explained in words retail IT can act on.
//!
//! Invariants:
//! - A configured CA file replaces the system roots; without one the platform verifier (the
//!   system's trust store) decides, the same verifier reqwest uses, so both paths agree.
//! - A client certificate always comes with its key, and they must match; that is checked when
//!   the config is read, not at the first connection.
//! - Nothing here logs key material or certificate contents.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig};

/// A problem with one of the configured files: which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct FileError {
    /// `ca_file`, `cert_file` or `key_file`.
    pub key: &'static str,
    pub message: String,
}

/// Every certificate in a PEM file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// A client certificate chain and its private key, checked to belong together.
pub fn read_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), FileError> {
    let certs = read_certs(cert).map_err(|message| FileError {
        key: "cert_file",
        message,
    })?;
    let bytes = std::fs::read(key).map_err(|e| FileError {
        key: "key_file",
        message: format!("cannot read {}: {e}", key.display()),
    })?;
    let private = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| FileError {
        key: "key_file",
        message: format!(
            "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it ({e})",
            key.display()
        ),
    })?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(private.clone_key())
        .map_err(|e| FileError {
            key: "key_file",
            message: format!("{}: unusable private key: {e}", key.display()),
        })?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    if let Err(e) = certified.keys_match() {
        return Err(FileError {
            key: "key_file",
            message: format!(
                "{} does not belong to the certificate in {} ({e})",
                key.display(),
                cert.display()
            ),
        });
    }
    Ok((certs, private))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS settings of one path to central.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles<'a> {
    pub ca_file: Option<&'a Path>,
    pub cert_file: Option<&'a Path>,
    pub key_file: Option<&'a Path>,
}

/// A rustls client config: the CA file's roots (or the system's), the client identity when
/// given, and the ALPN protocols the caller speaks.
pub fn client_config(files: &TlsFiles<'_>, alpn: &[&[u8]]) -> Result<ClientConfig, FileError> {
    crate::install_crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FileError {
            key: "ca_file",
            message: format!("TLS setup: {e}"),
        })?;
    let builder = match files.ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca).map_err(|message| FileError {
                key: "ca_file",
                message,
            })? {
                roots.add(cert).map_err(|e| FileError {
                    key: "ca_file",
                    message: format!("{}: not a usable CA certificate ({e})", ca.display()),
                })?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder.with_platform_verifier().map_err(|e| FileError {
                key: "ca_file",
                message: format!("the system's trust store cannot be used ({e}); set a CA file"),
            })?
        }
    };
    let mut config = match (files.cert_file, files.key_file) {
        (Some(cert), Some(key)) => {
            let (certs, key) = read_identity(cert, key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| FileError {
                    key: "cert_file",
                    message: format!("client certificate: {e}"),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The rustls error somewhere in a chain of errors, if any. `io::Error` hides its payload from
/// `source()` (it returns the payload's own source), so it is unwrapped by hand.
fn find_rustls<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = find_rustls(inner)
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// Says in words why a TLS handshake with `host` failed, naming the config keys of `section`
/// (`central.mqtt`, `central.https`) that fix it; `None` when the error is not about TLS.
pub fn explain(error: &(dyn StdError + 'static), host: &str, section: &str) -> Option<String> {
    let e = find_rustls(error)?;
    let text = match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => format!(
                "TLS: {host}'s certificate is signed by an unknown CA (UnknownIssuer); set {section}.ca_file to the CA that signed it, or check that it is the right file"
            ),
            CertificateError::NotValidForName => format!(
                "TLS: {host}'s certificate is not valid for the name {host:?}; it needs a subjectAltName with that name (a CN alone is not accepted)"
            ),
            CertificateError::NotValidForNameContext { presented, .. } if presented.is_empty() => {
                format!(
                    "TLS: {host}'s certificate has no subjectAltName, so it is valid for no name (a CN alone is not accepted); central must issue it with a SAN for {host:?}"
                )
            }
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "TLS: {host}'s certificate is not valid for the name {host:?}; it names {}",
                presented.join(", ")
            ),
            // A CA of the same name but another key: what a wrong file in ca_file looks like.
            CertificateError::BadSignature => format!(
                "TLS: {host}'s certificate is not signed by the configured CA (BadSignature); set {section}.ca_file to the CA that signed it, or check that it is the right file"
            ),
            CertificateError::Expired => format!("TLS: {host}'s certificate has expired"),
            CertificateError::ExpiredContext { time, not_after } => format!(
                "TLS: {host}'s certificate expired at {} (the gateway's clock says {}); central must renew it, or the gateway's clock is wrong",
                unix(not_after.as_secs()),
                unix(time.as_secs())
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "TLS: {host}'s certificate is not valid yet; check the gateway's clock (NTP)"
            ),
            CertificateError::Revoked => format!("TLS: {host}'s certificate has been revoked"),
            other => format!("TLS: {host}'s certificate was rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => format!(
                "TLS: {host} requires a client certificate; set {section}.cert_file and {section}.key_file"
            ),
            AlertDescription::CertificateExpired => {
                format!("TLS: {host} says our client certificate ({section}.cert_file) has expired")
            }
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => format!(
                "TLS: {host} rejected our client certificate ({alert:?}); check {section}.cert_file and {section}.key_file, and that central trusts the CA that issued it"
            ),
            AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion => format!(
                "TLS: {host} refused the handshake ({alert:?}); the server may require a client certificate or a TLS version or cipher this agent does not offer"
            ),
            other => format!("TLS: {host} ended the handshake ({other:?})"),
        },
        other => format!("TLS with {host}: {other}"),
    };
    Some(text)
}

fn unix(secs: u64) -> String {
    jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{secs} s after 1970"))
}

/// Renders an error with its causes on one line (`a: b: c`); reqwest's top level alone says
/// only "error sending request", while the certificate problem is three sources down.
pub fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// An HTTPS client for central on the shared TLS setup (HTTP/2 or 1.1); `HTTPS_PROXY` honoured.
pub fn https_client(
    files: &TlsFiles<'_>,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, FileError> {
    let tls = client_config(files, &[b"h2", b"http/1.1"])?;
    reqwest::Client::builder()
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(std::time::Duration::from_secs(15))
        .user_agent(concat!("storelink/", env!("CARGO_PKG_VERSION")))
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| FileError {
            key: "base_url",
            message: format!("cannot build the HTTPS client: {}", chain(&e)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapped(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn explains_certificate_failures_inside_io_errors() {
        let unknown = io_wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let text = explain(&unknown, "broker.example", "central.mqtt").unwrap();
        assert!(text.contains("unknown CA"), "{text}");
        assert!(text.contains("central.mqtt.ca_file"), "{text}");

        let no_san = io_wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: rustls::pki_types::ServerName::try_from("broker.example")
                    .unwrap()
                    .to_owned(),
                presented: vec![],
            },
        ));
        let text = explain(&no_san, "broker.example", "central.mqtt").unwrap();
        assert!(text.contains("no subjectAltName"), "{text}");

        let expired = io_wrapped(rustls::Error::InvalidCertificate(
            CertificateError::ExpiredContext {
                time: rustls::pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(1_800_000_000),
                ),
                not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(1_700_000_000),
                ),
            },
        ));
        let text = explain(&expired, "broker.example", "central.mqtt").unwrap();
        assert!(text.contains("expired at 2023-11-14"), "{text}");

        let required = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let text = explain(&required, "h", "central.https").unwrap();
        assert!(text.contains("central.https.cert_file"), "{text}");

        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(explain(&plain, "h", "central.mqtt"), None);
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        assert!(
            read_certs(&not_pem)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        let missing = dir.path().join("missing.pem");
        let e = read_identity(&missing, &missing).unwrap_err();
        assert_eq!(e.key, "cert_file");
    }
}
