//! The one HTTP client of an execution environment, for Azure and for AWS alike: HTTP/1.1 over
//! rustls (ring), trusting a compiled-in copy of Mozilla's root set (webpki-roots) plus any CA
//! named by `EXTRA_CA_CERTS`. A cold start reads no certificate file and parses no certificate
//! unless one is configured: the system store (about 146 files in /etc/ssl/certs) was the largest
//! piece of start-up work the hello-world does not do (README, "Cold start and size").
//!
//! The AWS SDK calls AWS through this client too ([`SdkHttp`]), so the binary carries one TLS stack,
//! one HTTP stack and one connection pool instead of two.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// How long a new connection (TCP and TLS) may take before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections are kept a little under Azure's own idle limit, so reuse never meets a
/// connection the far end has already dropped.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Certificates to trust beyond the public roots, read from the PEM file `EXTRA_CA_CERTS` names
/// (a corporate proxy's CA, or a test CA).
#[derive(Clone, Default)]
pub struct ExtraRoots(Arc<[CertificateDer<'static>]>);

impl fmt::Debug for ExtraRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExtraRoots({} certificates)", self.0.len())
    }
}

/// Why the extra roots could not be used; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    Empty { path: String },
    #[error("{path}: certificate {index} is not a usable CA certificate: {reason}")]
    Invalid {
        path: String,
        index: usize,
        reason: String,
    },
}

impl ExtraRoots {
    /// Every certificate in the PEM file at `path`; each is checked here, at cold start, so a bad
    /// file is an error that names it rather than a failed handshake later.
    pub fn from_pem_file(path: &Path) -> Result<Self, RootsError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| RootsError::Read {
            path: shown.clone(),
            source,
        })?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .enumerate()
            .map(|(i, cert)| {
                cert.map_err(|e| RootsError::Invalid {
                    path: shown.clone(),
                    index: i + 1,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if certificates.is_empty() {
            return Err(RootsError::Empty { path: shown });
        }
        let mut probe = RootCertStore::empty();
        for (i, cert) in certificates.iter().enumerate() {
            probe.add(cert.clone()).map_err(|e| RootsError::Invalid {
                path: shown.clone(),
                index: i + 1,
                reason: e.to_string(),
            })?;
        }
        Ok(Self(certificates.into()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("the HTTP client could not be built: {0}")]
pub struct ClientError(String);

/// Built once per execution environment; cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
}

impl Http {
    pub fn new(extra: &ExtraRoots) -> Result<Self, ClientError> {
        let roots = root_store(extra)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // HTTP/1.1 only: Azure OpenAI and AWS serve it, and one protocol keeps h2 out of the binary.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .user_agent(concat!("fallback-chat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            // Azure and AWS answer API calls where they are made; a redirect is a failure to
            // report, not a hop to follow with a key (and following costs a URL parse per call).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError(e.to_string()))?;
        Ok(Self { client })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// This client as the AWS SDK's transport (`aws_config::defaults(..).http_client(..)`).
    pub fn for_aws(&self) -> SdkHttp {
        SdkHttp(self.client.clone())
    }
}

/// The public roots, then the extra ones: added to, never replaced.
fn root_store(extra: &ExtraRoots) -> Result<RootCertStore, ClientError> {
    // The compiled-in roots are already parsed trust anchors: copying them costs no parsing.
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra.0.iter() {
        roots
            .add(cert.clone())
            .map_err(|e| ClientError(e.to_string()))?;
    }
    Ok(roots)
}

/// The AWS SDK's [`HttpClient`] over [`Http`]'s reqwest client. Written here rather than taken
/// from a crate: the two published adapters (aws-smithy-http-client-reqwest,
/// smithy-transport-reqwest) are single-maintainer 0.1 releases, and neither tells the SDK's
/// retry logic a timeout from an I/O error, which it needs to classify failures.
#[derive(Clone, Debug)]
pub struct SdkHttp(reqwest::Client);

impl HttpClient for SdkHttp {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(SdkConnector {
            client: self.0.clone(),
            read_timeout: settings.read_timeout(),
        })
    }
}

#[derive(Debug)]
struct SdkConnector {
    client: reqwest::Client,
    read_timeout: Option<Duration>,
}

impl HttpConnector for SdkConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        let read_timeout = self.read_timeout;
        HttpConnectorFuture::new(async move {
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()).never_connected())?
                .map(|body: SdkBody| match body.bytes() {
                    // Every call this function makes has a small body held in memory.
                    Some(bytes) => reqwest::Body::from(bytes.to_vec()),
                    None => reqwest::Body::wrap(body),
                });
            let mut request = reqwest::Request::try_from(request)
                .map_err(|e| ConnectorError::user(e.into()).never_connected())?;
            if let Some(limit) = read_timeout {
                *request.timeout_mut() = Some(limit);
            }
            let response = client.execute(request).await.map_err(connector_error)?;
            // The body stays a stream, as with the SDK's own client: the SDK reads it, and its
            // TRACE log of the response shows no content (a secret's value, say).
            let response = ::http::Response::from(response).map(SdkBody::from_body_1_x);
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// Tells the SDK's retry classifier what kind of failure it was.
fn connector_error(error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        ConnectorError::timeout(error.into())
    } else if error.is_connect() {
        ConnectorError::io(error.into()).never_connected()
    } else {
        ConnectorError::io(error.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_roots_are_compiled_in() {
        assert!(webpki_roots::TLS_SERVER_ROOTS.len() > 100);
        assert_eq!(
            root_store(&ExtraRoots::default()).unwrap().len(),
            webpki_roots::TLS_SERVER_ROOTS.len()
        );
        Http::new(&ExtraRoots::default()).unwrap();
    }

    #[tokio::test]
    async fn extra_roots_are_added_to_the_public_ones() {
        let emulator = azure_openai_emulator::Emulator::builder()
            .tls()
            .start()
            .await
            .unwrap();
        let path = std::env::temp_dir().join(format!("fc-extra-{}.pem", std::process::id()));
        // Two CAs in one file, as a corporate bundle often is.
        let pem = emulator.ca_pem().unwrap();
        std::fs::write(&path, format!("{pem}\n{pem}")).unwrap();
        let extra = ExtraRoots::from_pem_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(extra.len(), 2);
        assert_eq!(
            root_store(&extra).unwrap().len(),
            webpki_roots::TLS_SERVER_ROOTS.len() + 2
        );
    }

    #[test]
    fn a_file_without_certificates_is_an_error_that_names_it() {
        let dir = std::env::temp_dir().join(format!("fc-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = ExtraRoots::from_pem_file(&empty).unwrap_err().to_string();
        assert!(
            error.contains("empty.pem") && error.contains("no PEM certificate"),
            "{error}"
        );

        let garbled = dir.join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = ExtraRoots::from_pem_file(&garbled).unwrap_err().to_string();
        assert!(error.contains("certificate 1"), "{error}");

        let missing = dir.join("missing.pem");
        let error = ExtraRoots::from_pem_file(&missing).unwrap_err().to_string();
        assert!(
            error.contains("cannot read") && error.contains("missing.pem"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
