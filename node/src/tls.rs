//! TLS for the node's ports (rustls with the aws-lc-rs provider):
//!
//! - the HTTP APIs (18180, 18181): the certificate and key of `server.tls_cert_file` and
//!   `server.tls_key_file`, served through a resolver that [`HttpTls::reload`] swaps (SIGHUP),
//!   so connections made after a reload get the new certificate and none is cut;
//! - the transport (18182): mutual TLS with the cluster CA (`cluster.tls_ca_file`,
//!   `cluster.tls_cert_file`, `cluster.tls_key_file`). Each side proves itself with a
//!   certificate the CA signed; a peer without one, or with one of another CA, is refused at
//!   the handshake. Node certificates carry the DNS name [`CLUSTER_SERVER_NAME`], which clients
//!   check (nodes are reached by addresses that change, the CA is what is trusted);
//! - `stemedb certs create-ca|create-node` ([`create_ca`], [`create_node`]): a development CA
//!   and node certificates (rcgen);
//! - the clients of those HTTP APIs ([`http_client`], [`client_config`]): a joining node and the
//!   operator commands, trusting the system's roots and a given CA file.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorCode;

/// The DNS name every node certificate carries and every node checks on its peers.
pub const CLUSTER_SERVER_NAME: &str = "stemedb-node";

/// How long a TLS handshake may take before the connection is dropped (peers on one network
/// finish in milliseconds; a silent client holds a handshake slot no longer than this).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS settings: {0}")]
    Settings(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

impl TlsError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::TlsInvalid
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// The certificates of a PEM file, in order (a chain: leaf first).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// An HTTP client (reqwest) that speaks HTTPS trusting the system's roots, and also the
/// certificates of the PEM file `ca` when given: for the node's own requests to other nodes'
/// HTTP APIs (joining) and the operator commands (`stemedb cluster`, `backup create`, `bench`).
pub fn http_client(ca: Option<&Path>, timeout: Duration) -> Result<reqwest::ClientBuilder, TlsError> {
    let mut builder = reqwest::Client::builder().timeout(timeout);
    if let Some(ca) = ca {
        for cert in read_certs(ca)? {
            let cert = reqwest::Certificate::from_der(&cert).map_err(|e| file_error(ca, e))?;
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// A rustls client config that trusts only the certificates of the PEM file `ca`: for clients
/// that speak HTTP themselves over TLS (`stemedb bench`'s load connections).
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = root_store(ca)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificates of the PEM file `ca` as trust roots.
fn root_store(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).map_err(|e| file_error(ca, e))?;
    }
    Ok(roots)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, format!("no usable PEM private key: {e}")))
}

/// A certificate chain and its key, read once and checked to belong together.
fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    certified(chain.clone(), key_der.clone_key(), cert, key)?;
    Ok((chain, key_der))
}

/// The signing form of a chain and its key, checked to belong together.
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key_der: PrivateKeyDer<'static>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing = provider().key_provider.load_private_key(key_der).map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Settings(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(certified))
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    certified(read_certs(cert)?, read_key(key)?, cert, key)
}

/// Serves the current certificate of the HTTP ports.
#[derive(Debug)]
struct Current(parking_lot::RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// TLS of the HTTP ports: an acceptor whose certificate [`HttpTls::reload`] replaces.
pub struct HttpTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl HttpTls {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<HttpTls>, TlsError> {
        let current = Arc::new(Current(parking_lot::RwLock::new(certified_key(cert, key)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Settings(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(Arc::new(HttpTls { cert: cert.to_path_buf(), key: key.to_path_buf(), current, acceptor }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reads the certificate and key files again; on an error the served pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.cert, &self.key)?;
        *self.current.0.write() = fresh;
        Ok(())
    }
}

/// The files of the cluster's mutual TLS.
#[derive(Debug, Clone)]
pub struct ClusterTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

struct ClusterConfigs {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

/// Mutual TLS of the transport: both sides' configs, rebuilt by [`ClusterTls::reload`].
pub struct ClusterTls {
    files: ClusterTlsFiles,
    configs: parking_lot::RwLock<Arc<ClusterConfigs>>,
}

fn cluster_configs(files: &ClusterTlsFiles) -> Result<ClusterConfigs, TlsError> {
    let roots = Arc::new(root_store(&files.ca)?);
    let (chain, key) = read_pair(&files.cert, &files.key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Settings(e.to_string()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| file_error(&files.cert, e))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| file_error(&files.cert, e))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ClusterConfigs { server: Arc::new(server), client: Arc::new(client) })
}

impl ClusterTls {
    pub fn load(files: ClusterTlsFiles) -> Result<Arc<ClusterTls>, TlsError> {
        let configs = cluster_configs(&files)?;
        Ok(Arc::new(ClusterTls { files, configs: parking_lot::RwLock::new(Arc::new(configs)) }))
    }

    /// Reads the CA, certificate and key again; on an error the running ones stay. New
    /// connections use the new ones; open connections keep theirs.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = cluster_configs(&self.files)?;
        *self.configs.write() = Arc::new(fresh);
        Ok(())
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.configs.read().server.clone())
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.configs.read().client.clone())
    }

    /// Connects to a peer at `addr` and proves this node to it (and it to this node).
    pub async fn connect(&self, addr: &str) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        self.handshake(stream).await
    }

    /// Proves this node to the peer at the other end of `stream` (and it to this node).
    pub async fn handshake(
        &self,
        stream: tokio::net::TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name =
            ServerName::try_from(CLUSTER_SERVER_NAME).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector().connect(name, stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }
}

/// An accepted HTTP connection whose TLS handshake runs on its first read or write, in the
/// connection's own task (so a slow handshake never holds up the accept loop).
pub struct LazyTls<S> {
    state: LazyState<S>,
}

enum LazyState<S> {
    Handshaking(tokio_rustls::Accept<S>),
    Ready(Box<tokio_rustls::server::TlsStream<S>>),
    Failed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LazyTls<S> {
    pub fn new(acceptor: &tokio_rustls::TlsAcceptor, stream: S) -> LazyTls<S> {
        LazyTls { state: LazyState::Handshaking(acceptor.accept(stream)) }
    }

    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut tokio_rustls::server::TlsStream<S>>> {
        if let LazyState::Handshaking(accept) = &mut self.state {
            match Pin::new(accept).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => self.state = LazyState::Ready(Box::new(stream)),
                Poll::Ready(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    self.state = LazyState::Failed;
                    return Poll::Ready(Err(error));
                }
            }
        }
        match &mut self.state {
            LazyState::Ready(stream) => Poll::Ready(Ok(stream)),
            _ => Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "TLS handshake failed"))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for LazyTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_stream(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_read(cx, buf),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LazyTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut().poll_stream(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_write(cx, buf),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            LazyState::Ready(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            LazyState::Ready(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// What `create_ca` and `create_node` write.
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| file_error(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| file_error(path, e))
}

fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    if path.exists() {
        return Err(file_error(path, "exists already; not overwritten"));
    }
    std::fs::write(path, text).map_err(|e| file_error(path, e))
}

fn validity(params: &mut rcgen::CertificateParams, days: u32, expired: bool) {
    let now = time::OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - time::Duration::days(2);
        params.not_after = now - time::Duration::days(1);
    } else {
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(i64::from(days));
    }
}

/// A development cluster CA: `ca.pem` and `ca-key.pem` (mode 0600) in `dir`.
pub fn create_ca(dir: &Path, name: &str, days: u32) -> Result<Written, TlsError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days, false);
    let cert = params.self_signed(&key).map_err(generate)?;
    let written = Written { cert: dir.join("ca.pem"), key: dir.join("ca-key.pem") };
    write_public(&written.cert, &cert.pem())?;
    write_private(&written.key, &key.serialize_pem())?;
    Ok(written)
}

/// A node certificate signed by the CA in `ca_dir`, for the given host names and addresses
/// (and [`CLUSTER_SERVER_NAME`]), usable by servers and clients: `<name>.pem` and
/// `<name>-key.pem` in `out`. `expired` makes one that expired yesterday (for tests).
pub fn create_node(
    ca_dir: &Path,
    out: &Path,
    name: &str,
    hosts: &[String],
    days: u32,
    expired: bool,
) -> Result<Written, TlsError> {
    std::fs::create_dir_all(out).map_err(|e| file_error(out, e))?;
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_cert = std::fs::read_to_string(ca_dir.join("ca.pem")).map_err(|e| file_error(&ca_dir.join("ca.pem"), e))?;
    let ca_key_text =
        std::fs::read_to_string(ca_dir.join("ca-key.pem")).map_err(|e| file_error(&ca_dir.join("ca-key.pem"), e))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_text).map_err(generate)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(generate)?;
    let mut names = vec![CLUSTER_SERVER_NAME.to_string()];
    names.extend(hosts.iter().filter(|h| !h.is_empty()).cloned());
    let mut params = rcgen::CertificateParams::new(names).map_err(generate)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days, expired);
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    let written = Written { cert: out.join(format!("{name}.pem")), key: out.join(format!("{name}-key.pem")) };
    write_public(&written.cert, &cert.pem())?;
    write_private(&written.key, &key.serialize_pem())?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("tempdir");
            create_ca(&dir.path().join("ca"), "test CA", 30).expect("ca");
            create_ca(&dir.path().join("other-ca"), "another CA", 30).expect("other ca");
            Pki { dir }
        }

        fn node(&self, ca: &str, name: &str, expired: bool) -> ClusterTlsFiles {
            let written = create_node(
                &self.dir.path().join(ca),
                &self.dir.path().join("certs"),
                name,
                &["127.0.0.1".into()],
                30,
                expired,
            )
            .expect("node cert");
            ClusterTlsFiles { ca: self.dir.path().join(ca).join("ca.pem"), cert: written.cert, key: written.key }
        }
    }

    /// Accepts one connection with `server`'s TLS and echoes 4 bytes; returns whether `client`
    /// got them back.
    async fn exchange(server: &ClusterTls, client: Option<&ClusterTls>) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let acceptor = server.acceptor();
        let serving = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.ok()?;
            let mut tls = acceptor.accept(stream).await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            tls.write_all(&buf).await.ok()?;
            tls.flush().await.ok()
        });
        let ok = match client {
            Some(client) => async {
                let mut tls = client.connect(&addr).await.ok()?;
                tls.write_all(b"ping").await.ok()?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.ok()?;
                Some(&buf == b"ping")
            }
            .await
            .unwrap_or(false),
            None => {
                // No client certificate: a client that trusts the CA but shows nothing.
                let roots = root_store(&server.files.ca).expect("ca");
                let config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                async {
                    let stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
                    let mut tls =
                        connector.connect(ServerName::try_from(CLUSTER_SERVER_NAME).ok()?, stream).await.ok()?;
                    tls.write_all(b"ping").await.ok()?;
                    let mut buf = [0u8; 4];
                    tls.read_exact(&mut buf).await.ok()?;
                    Some(&buf == b"ping")
                }
                .await
                .unwrap_or(false)
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
        ok
    }

    #[tokio::test]
    async fn only_peers_with_a_valid_certificate_of_the_cluster_ca_get_through() {
        let pki = Pki::new();
        let server = ClusterTls::load(pki.node("ca", "node1", false)).expect("server");
        let good = ClusterTls::load(pki.node("ca", "node2", false)).expect("good");
        assert!(exchange(&server, Some(&good)).await, "a node of the cluster CA");
        let wrong_ca = ClusterTls::load(pki.node("other-ca", "intruder", false)).expect("wrong ca");
        assert!(!exchange(&server, Some(&wrong_ca)).await, "a certificate of another CA");
        let expired = ClusterTls::load(pki.node("ca", "old", true)).expect("expired");
        assert!(!exchange(&server, Some(&expired)).await, "an expired certificate");
        assert!(!exchange(&server, None).await, "no client certificate");
        // The client refuses a server of another CA as well.
        let other_server = ClusterTls::load(pki.node("other-ca", "fake-server", false)).expect("fake");
        assert!(!exchange(&other_server, Some(&good)).await, "a server of another CA");
    }

    #[tokio::test]
    async fn a_reload_takes_new_files_and_a_bad_one_keeps_the_old() {
        let pki = Pki::new();
        let files = pki.node("ca", "node1", false);
        let server = ClusterTls::load(files.clone()).expect("server");
        std::fs::write(&files.cert, "not a certificate").expect("write");
        assert!(server.reload().is_err());
        let good = ClusterTls::load(pki.node("ca", "node2", false)).expect("good");
        assert!(exchange(&server, Some(&good)).await, "the running configs stayed");
        let http = {
            let written = create_node(&pki.dir.path().join("ca"), &pki.dir.path().join("http"), "web", &[], 30, false)
                .expect("cert");
            HttpTls::load(&written.cert, &written.key).expect("http")
        };
        std::fs::write(pki.dir.path().join("http").join("web-key.pem"), "garbage").expect("write");
        assert!(http.reload().is_err(), "a bad key is refused");
    }

    #[test]
    fn files_are_checked_and_never_overwritten() {
        let pki = Pki::new();
        assert!(create_ca(&pki.dir.path().join("ca"), "again", 30).is_err(), "an existing CA is kept");
        let missing = ClusterTlsFiles { ca: "/nonexistent/ca.pem".into(), cert: "/x".into(), key: "/y".into() };
        let error = ClusterTls::load(missing).err().expect("missing files").to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                std::fs::metadata(pki.dir.path().join("ca").join("ca-key.pem")).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "private keys are the owner's only");
        }
    }
}
