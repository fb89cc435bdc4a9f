//! HTTPS for [`crate::EmulatorBuilder::tls`]: a test CA generated at start, a leaf certificate it
//! signs for the loopback names, and the rustls server configuration serving that leaf.
//!
//! A fresh CA per emulator, never one on disk, so nothing trusts it but the tests that are handed
//! its PEM ([`crate::Emulator::ca_pem`]): the client under test has to be configured to trust an
//! extra CA, as it would for a private endpoint, rather than skip verification.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// The test CA's subject common name.
const CA_NAME: &str = "fallback-chat test CA";

/// A generated CA and an acceptor serving a leaf certificate it signed.
pub(crate) struct TestTls {
    /// The CA certificate in PEM, for clients to trust.
    pub ca_pem: String,
    pub acceptor: TlsAcceptor,
}

impl TestTls {
    /// Generates the CA (ECDSA P-256, self-signed, unconstrained) and a leaf for `localhost`,
    /// `127.0.0.1` and `::1`, and configures rustls with the ring provider and ALPN `http/1.1`.
    ///
    /// The provider is given to the config rather than installed process-wide, so the emulator
    /// neither needs nor changes the default provider of the process it runs in (a test binary
    /// that also runs the function, which may install its own).
    pub(crate) fn generate() -> io::Result<TestTls> {
        let ca_key = KeyPair::generate().map_err(io::Error::other)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, CA_NAME);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(io::Error::other)?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf_key = KeyPair::generate().map_err(io::Error::other)?;
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().map_err(io::Error::other)?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .map_err(io::Error::other)?;

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            // The leaf alone: clients hold the CA as their trust anchor.
            .with_single_cert(vec![leaf_cert.der().clone()], key)
            .map_err(io::Error::other)?;
        // The emulator speaks HTTP/1.1 only; saying so keeps an h2-capable client from choosing h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TestTls {
            ca_pem: ca_cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_pem_ca_and_an_http11_only_config() {
        let tls = TestTls::generate().expect("generated");
        assert!(
            tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----\n"),
            "{}",
            tls.ca_pem
        );
        assert!(tls.ca_pem.trim_end().ends_with("-----END CERTIFICATE-----"));
        let alpn = &tls.acceptor.config().alpn_protocols;
        assert_eq!(alpn, &[b"http/1.1".to_vec()]);
        // Each emulator gets its own CA.
        assert_ne!(TestTls::generate().expect("generated").ca_pem, tls.ca_pem);
    }
}
