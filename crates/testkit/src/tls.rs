//! Certificates made at test time, for the tests of TLS: a CA, a server certificate it signs,
//! and a CA that signed nothing.

use std::path::{Path, PathBuf};

use crate::{wait_port, Proc};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A CA, a server certificate it signed for `names`, and a CA nobody used: in a temporary
/// directory removed with it.
pub struct Pki {
    pub dir: PathBuf,
    /// The test CA's certificate (PEM file).
    pub ca: PathBuf,
    /// Another CA's: the server certificate does not chain to it.
    pub other_ca: PathBuf,
    pub cert: String,
    pub key: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    /// A server certificate for `names` (host names or IP addresses).
    pub fn new(names: &[&str]) -> Pki {
        let dir = std::env::temp_dir().join(format!("stalewatch-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let ca_params = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let (ca_key, other_key) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let ca_cert = ca_params("stalewatch test CA")
            .self_signed(&ca_key)
            .unwrap();
        let other_cert = ca_params("another CA").self_signed(&other_key).unwrap();
        let issuer = Issuer::new(ca_params("stalewatch test CA"), ca_key);

        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "stalewatch test server");
        let server_key = KeyPair::generate().unwrap();
        let server_cert = params.signed_by(&server_key, &issuer).unwrap();

        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (cert, key) = (server_cert.pem(), server_key.serialize_pem());
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            other_ca: write("other-ca.pem", &other_cert.pem()),
            cert_file: write("server.crt", &cert),
            key_file: write("server.key", &key),
            cert,
            key,
            dir,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of the test's own that speaks only TLS, on `port`, with `pki`'s server
/// certificate (no client certificates asked for). Returns once it accepts connections.
pub async fn redis_server(port: u16, pki: &Pki) -> Proc {
    let port_arg = port.to_string();
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let (cert, key) = (path(&pki.cert_file), path(&pki.key_file));
    let args = [
        "--port",
        "0",
        "--tls-port",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let proc = Proc::spawn(Path::new("redis-server"), &args, &[]);
    wait_port(port).await;
    proc
}
