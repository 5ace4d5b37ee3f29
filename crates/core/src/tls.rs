//! TLS to PostgreSQL and Redis, through rustls (ring as its crypto), in one place.
//!
//! PostgreSQL follows libpq: `sslmode` and `sslrootcert` in `DATABASE_URL` (or
//! `DATABASE_CA_FILE`, which [`with_root_cert`] writes into the URL as `sslrootcert`):
//!
//! | `sslmode` | TLS | the certificate is checked against the CA | and the host name |
//! |---|---|---|---|
//! | `disable` | never | - | - |
//! | `prefer` (the default) | when the server offers it | no | no |
//! | `require` | always | only when a CA file is given (as libpq) | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |
//!
//! A unix socket never has TLS, whatever `sslmode` says (as in libpq). The CA is the file
//! `sslrootcert` names, or the system's roots (rustls-native-certs) when
//! there is none or it is `system`. Every PostgreSQL connection of stalewatch goes through
//! [`postgres`]: the pool, migrations, the outbox listener; the replication connection of
//! change capture through [`replication`] (pgwire-replication's own rustls, whose default
//! roots are Mozilla's, webpki-roots, rather than the system's).
//!
//! Redis: a `rediss://` URL is TLS, checked against the system's roots or `REDIS_CA_FILE`
//! ([`redis`]), host name included. The redis crate does the rest, for the shared connection,
//! apalis's and the invalidation consumers' pool alike.

use std::{
    fmt,
    path::{Path, PathBuf},
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{
    config::Host,
    tls::{ChannelBinding, MakeTlsConnect, TlsConnect},
};

use crate::redact;

/// A TLS setting that cannot be used; the message names the variable or parameter to fix.
/// It never quotes a password: URLs in it are masked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl TlsError {
    fn new(message: impl Into<String>) -> Self {
        Self(redact::url(&message.into()))
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            // `allow` tries plain first, then TLS: treated as `prefer`, which tries TLS first.
            "allow" => Ok(Self::Prefer),
            _ => Err(TlsError::new(format!(
                "invalid sslmode={s:?} in DATABASE_URL: expected disable, prefer, require, verify-ca or verify-full"
            ))),
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        })
    }
}

/// Whom a server certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Roots {
    /// The operating system's trusted roots.
    #[default]
    System,
    /// The certificates of a PEM file (and only those).
    File(PathBuf),
}

/// The TLS part of a `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTls {
    pub mode: SslMode,
    pub roots: Roots,
    /// `sslrootcert` was given (a file or `system`): `require` then checks the chain, as in
    /// libpq.
    pub root_cert_given: bool,
}

impl PgTls {
    /// Whether the certificate chain is checked.
    pub fn verifies_chain(&self) -> bool {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => false,
            SslMode::Require => self.root_cert_given,
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        }
    }
}

/// `url` with `DATABASE_CA_FILE` added as its `sslrootcert` parameter, unless the URL names
/// one already (the URL wins).
pub fn with_root_cert(url: &str, ca_file: &Path) -> String {
    let (_, tls) = split_url(url);
    if tls.iter().any(|(k, _)| k == "sslrootcert") {
        return url.to_string();
    }
    let file = ca_file.display().to_string();
    if is_url(url) {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}sslrootcert={}", percent_encode(&file))
    } else {
        format!(
            "{url} sslrootcert='{}'",
            file.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }
}

/// Reads `DATABASE_URL`: the settings tokio-postgres takes, and the TLS connector its
/// `sslmode` and `sslrootcert` ask for. Fails on a bad `sslmode` or an unreadable CA file.
pub fn postgres(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), TlsError> {
    let (config, tls) = postgres_settings(url)?;
    let connector = MakeRustlsConnect::new(&tls)?;
    Ok((config, connector))
}

/// The settings of `DATABASE_URL` without building a connector: tokio-postgres's
/// configuration (its `sslmode` `disable`, `prefer` or `require`: the checks are ours), and
/// what TLS asks for.
pub fn postgres_settings(url: &str) -> Result<(tokio_postgres::Config, PgTls), TlsError> {
    let (rest, params) = split_url(url);
    let mut tls = PgTls::default();
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => tls.mode = value.parse()?,
            "sslrootcert" => {
                tls.root_cert_given = true;
                tls.roots = if value == "system" {
                    Roots::System
                } else {
                    Roots::File(PathBuf::from(value))
                };
            }
            _ => {}
        }
    }
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| TlsError::new(format!("invalid DATABASE_URL: {e}")))?;
    // As libpq: a unix socket never has TLS, whatever sslmode says.
    let hosts = config.get_hosts();
    if !hosts.is_empty() && hosts.iter().all(|h| !matches!(h, Host::Tcp(_))) {
        tls.mode = SslMode::Disable;
    }
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok((config, tls))
}

/// What the replication connection of change capture is given: it has TLS of its own
/// (pgwire-replication's), which the worker sets from this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationTls {
    /// `Require` here never checks the chain: a `require` that does is `VerifyCa`.
    pub mode: SslMode,
    /// `None`: pgwire-replication's default roots (Mozilla's, webpki-roots).
    pub ca: Option<PathBuf>,
}

/// The replication connection's TLS settings.
pub fn replication(tls: &PgTls) -> ReplicationTls {
    let ca = match &tls.roots {
        Roots::File(path) => Some(path.clone()),
        Roots::System => None,
    };
    let mode = match tls.mode {
        SslMode::Require if tls.verifies_chain() => SslMode::VerifyCa,
        mode => mode,
    };
    ReplicationTls { mode, ca }
}

/// `REDIS_URL` as the redis crate connects to it: for `rediss://`, checked against the
/// certificates of `ca_file` when given, else the system's roots. `ca_file` is ignored for a
/// plain `redis://` URL.
pub fn redis(url: &str, ca_file: Option<&Path>) -> Result<redis::ConnectionInfo, TlsError> {
    redis_as(("REDIS_URL", "REDIS_CA_FILE"), url, ca_file)
}

/// As [`redis`], for the setting `vars` names (the URL's variable and the CA file's), which
/// errors name.
pub fn redis_as(
    vars: (&str, &str),
    url: &str,
    ca_file: Option<&Path>,
) -> Result<redis::ConnectionInfo, TlsError> {
    use redis::IntoConnectionInfo;
    let (url_var, ca_var) = vars;
    install_crypto_provider();
    let info = url
        .into_connection_info()
        .map_err(|e| TlsError::new(format!("invalid {url_var} {url}: {e}")))?;
    let (redis::ConnectionAddr::TcpTls { .. }, Some(ca_file)) = (info.addr(), ca_file) else {
        return Ok(info);
    };
    let pem = read_ca_file(ca_file, ca_var)?.1;
    let client = redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| TlsError::new(format!("{ca_var}={}: {e}", ca_file.display())))?;
    Ok(client.get_connection_info().clone())
}

/// The seed nodes of a Redis Cluster: `urls` comma-separated, as `vars` name them (the URLs'
/// variable and the CA file's). The CA's certificates, when a `rediss://` node needs them, go
/// to every node's connection (the redis crate's cluster client takes them apart).
pub fn redis_cluster(
    vars: (&str, &str),
    urls: &str,
    ca_file: Option<&Path>,
) -> Result<crate::cluster::Seeds, TlsError> {
    use redis::IntoConnectionInfo;
    let (url_var, ca_var) = vars;
    install_crypto_provider();
    let nodes = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.into_connection_info()
                .map_err(|e| TlsError::new(format!("invalid {url_var} seed node {u}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if nodes.is_empty() {
        return Err(TlsError::new(format!(
            "{url_var} names no seed node: give one or more comma-separated redis:// URLs"
        )));
    }
    let tls = nodes
        .iter()
        .any(|n| matches!(n.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let ca = match (tls, ca_file) {
        (true, Some(ca_file)) => Some(read_ca_file(ca_file, ca_var)?.1),
        _ => None,
    };
    Ok(crate::cluster::Seeds { nodes, ca })
}

/// What `cache::connect` and `queue::connect` take: a URL, or the [`redis::ConnectionInfo`]
/// of [`redis`] (`Config::redis`), which carries `REDIS_CA_FILE`.
pub trait RedisTarget {
    fn connection_info(self) -> redis::RedisResult<redis::ConnectionInfo>;
}

impl RedisTarget for &str {
    fn connection_info(self) -> redis::RedisResult<redis::ConnectionInfo> {
        redis::IntoConnectionInfo::into_connection_info(self)
    }
}

impl RedisTarget for &String {
    fn connection_info(self) -> redis::RedisResult<redis::ConnectionInfo> {
        self.as_str().connection_info()
    }
}

impl RedisTarget for redis::ConnectionInfo {
    fn connection_info(self) -> redis::RedisResult<redis::ConnectionInfo> {
        Ok(self)
    }
}

impl RedisTarget for &redis::ConnectionInfo {
    fn connection_info(self) -> redis::RedisResult<redis::ConnectionInfo> {
        Ok(self.clone())
    }
}

/// A client of `target`, with rustls ready for a `rediss://` one.
pub fn redis_client(target: impl RedisTarget) -> redis::RedisResult<redis::Client> {
    install_crypto_provider();
    redis::Client::open(target.connection_info()?)
}

/// Makes ring rustls's process-wide crypto provider, which the redis crate builds its TLS
/// configurations with. (Two providers are compiled in: pgwire-replication's tokio-rustls
/// brings aws-lc-rs; with two, rustls picks none by itself.) Cheap after the first call.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Loses only a race with another thread installing one: either is fine.
        let _ = ring::default_provider().install_default();
    }
}

fn provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(ring::default_provider()))
}

/// The certificates of a PEM file, parsed and as read. `var` names the setting in errors.
fn read_ca_file(
    path: &Path,
    var: &str,
) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), TlsError> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| TlsError::new(format!("{var}: cannot read the CA file {shown}: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(format!("{var}: {shown} is not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::new(format!(
            "{var}: {shown} holds no certificate (expected PEM, -----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok((certs, pem))
}

fn root_store(roots: &Roots) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            for cert in read_ca_file(path, "sslrootcert (DATABASE_CA_FILE)")?.0 {
                store.add(cert).map_err(|e| {
                    TlsError::new(format!(
                        "sslrootcert (DATABASE_CA_FILE): a certificate of {} cannot be a root: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(": {e}"));
                return Err(TlsError::new(format!(
                    "no trusted root certificates found on this system{}; set sslrootcert or DATABASE_CA_FILE to the server's CA",
                    why.unwrap_or_default()
                )));
            }
        }
    }
    Ok(store)
}

/// The rustls configuration `tls` asks for (not used with `sslmode=disable`).
fn client_config(tls: &PgTls) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(format!("TLS set-up: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.verifies_chain() {
        let roots = Arc::new(root_store(&tls.roots)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsError::new(format!("TLS set-up: {e}")))?;
        if tls.mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        }
    } else {
        Arc::new(Unchecked(provider))
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `verify-ca`: the chain is checked, the name in the certificate is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name after the chain: a wrong name means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` (without a CA): encrypted, any certificate accepted. The
/// handshake's signatures are still checked.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres's TLS connector over rustls. Channel binding is not offered: SCRAM runs
/// without it (`SCRAM-SHA-256`, as libpq's default `channel_binding=prefer` falls back to).
#[derive(Clone)]
pub struct MakeRustlsConnect {
    /// `None` with `sslmode=disable`: never asked to connect.
    config: Option<Arc<ClientConfig>>,
}

impl MakeRustlsConnect {
    pub fn new(tls: &PgTls) -> Result<Self, TlsError> {
        let config = match tls.mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(client_config(tls)?)),
        };
        Ok(Self { config })
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<RustlsConnect> {
        // A unix socket has no host name (""), and is never asked for TLS: the name is only
        // checked when a handshake happens.
        Ok(RustlsConnect {
            config: self.config.clone(),
            domain: domain.to_string(),
        })
    }
}

pub struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    domain: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, std::io::Result<RustlsStream<S>>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| std::io::Error::other("TLS asked for with sslmode=disable"))?;
            let name = ServerName::try_from(self.domain.clone()).map_err(|_| {
                std::io::Error::other(format!("{:?} is not a host name for TLS", self.domain))
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` without its `sslmode` and `sslrootcert`, and those two (values decoded), in order.
/// A URL's query (`?sslmode=require&...`) or libpq's `key=value` form (unquoted values).
fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    const OURS: [&str; 2] = ["sslmode", "sslrootcert"];
    let mut taken = Vec::new();
    if is_url(url) {
        let (head, fragment) = match url.split_once('#') {
            Some((head, fragment)) => (head, Some(fragment)),
            None => (url, None),
        };
        let Some((base, query)) = head.split_once('?') else {
            return (url.to_string(), taken);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if OURS.contains(&key) {
                taken.push((key.to_string(), redact::percent_decode(value)));
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
        let mut rest = base.to_string();
        if !kept.is_empty() {
            rest.push('?');
            rest.push_str(&kept.join("&"));
        }
        if let Some(fragment) = fragment {
            rest.push('#');
            rest.push_str(fragment);
        }
        (rest, taken)
    } else {
        let mut kept = Vec::new();
        let mut words = url.split_whitespace().peekable();
        while let Some(word) = words.next() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if OURS.contains(&key.trim()) {
                let mut value = value.to_string();
                // `sslrootcert='/a path'`: a quoted value may hold spaces.
                if value.starts_with('\'') {
                    while !(value.len() > 1 && value.ends_with('\'')) {
                        match words.next() {
                            Some(next) => {
                                value.push(' ');
                                value.push_str(next);
                            }
                            None => break,
                        }
                    }
                    value = value
                        .trim_matches('\'')
                        .replace("\\'", "'")
                        .replace("\\\\", "\\");
                }
                taken.push((key.trim().to_string(), value));
            } else {
                kept.push(word);
            }
        }
        (kept.join(" "), taken)
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let (rest, taken) =
            split_url("postgres://u:p@db:5432/x?sslmode=verify-full&application_name=a&sslrootcert=%2Fetc%2Fca.pem");
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=a");
        assert_eq!(
            taken,
            vec![
                ("sslmode".to_string(), "verify-full".to_string()),
                ("sslrootcert".to_string(), "/etc/ca.pem".to_string())
            ]
        );
        let (rest, taken) = split_url("postgres://db/x?sslmode=require");
        assert_eq!(rest, "postgres://db/x");
        assert_eq!(taken.len(), 1);
        let (rest, taken) =
            split_url("host=db sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=x");
        assert_eq!(rest, "host=db dbname=x");
        assert_eq!(
            taken[1],
            ("sslrootcert".to_string(), "/a b/ca.pem".to_string())
        );
        assert_eq!(split_url("postgres://db/x").0, "postgres://db/x");
    }

    #[test]
    fn modes_follow_libpq() {
        let tls = |url: &str| postgres_settings(url).unwrap().1;
        assert_eq!(tls("postgres://db/x").mode, SslMode::Prefer);
        assert!(!tls("postgres://db/x?sslmode=require").verifies_chain());
        // libpq: `require` with a CA file checks the chain, as `verify-ca`.
        let given = tls("postgres://db/x?sslmode=require&sslrootcert=/ca.pem");
        assert!(given.verifies_chain());
        assert_eq!(given.roots, Roots::File("/ca.pem".into()));
        assert_eq!(replication(&given).mode, SslMode::VerifyCa);
        let system = tls("postgres://db/x?sslmode=verify-full&sslrootcert=system");
        assert_eq!(system.roots, Roots::System);
        assert_eq!(replication(&system).ca, None);
        let unix = tls("host=/var/run/postgresql dbname=x sslmode=require");
        assert_eq!(unix.mode, SslMode::Disable);
        let (config, _) = postgres_settings("postgres://u@db/x?sslmode=verify-full").unwrap();
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(config.get_dbname(), Some("x"));
    }

    #[test]
    fn a_bad_sslmode_is_named_without_the_password() {
        let e = postgres_settings("postgres://u:hunter2@db/x?sslmode=verify").unwrap_err();
        assert!(e.to_string().contains("sslmode=\"verify\""), "{e}");
        let e = postgres_settings("postgres://u:hunter2@db:port/x").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn the_ca_file_is_added_unless_the_url_names_one() {
        let ca = Path::new("/etc/my ca.pem");
        assert_eq!(
            with_root_cert("postgres://db/x", ca),
            "postgres://db/x?sslrootcert=/etc/my%20ca.pem"
        );
        assert_eq!(
            with_root_cert("postgres://db/x?sslmode=require", ca),
            "postgres://db/x?sslmode=require&sslrootcert=/etc/my%20ca.pem"
        );
        let named = "postgres://db/x?sslrootcert=system";
        assert_eq!(with_root_cert(named, ca), named);
        let (_, tls) = postgres_settings(&with_root_cert("host=db dbname=x", ca)).unwrap();
        assert_eq!(tls.roots, Roots::File(ca.into()));
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let e = redis(
            "rediss://:pw1234@cache:6380",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("REDIS_CA_FILE") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("stalewatch-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let tls = PgTls {
            mode: SslMode::VerifyFull,
            roots: Roots::File(empty.clone()),
            root_cert_given: true,
        };
        let e = MakeRustlsConnect::new(&tls).err().unwrap().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
        // A plain redis:// URL needs no CA.
        assert!(redis("redis://127.0.0.1:6379", Some(&empty)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
