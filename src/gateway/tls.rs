//! HTTPS for the page and the API: browsers open the microphone only on a secure origin (or
//! localhost). Either certificate files, or a self-signed certificate for this machine's names
//! and LAN address, kept in a folder so a phone only has to trust it once.

use axum_server::tls_rustls::RustlsConfig;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generated on first use into `dir` (`cert.pem`, `key.pem`) and reused afterwards.
    SelfSigned {
        dir: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating a certificate: {0}")]
    Generate(String),
}

/// A ready TLS configuration and the certificate it serves.
pub struct TlsSetup {
    pub config: RustlsConfig,
    pub cert_path: PathBuf,
    /// Names and addresses the certificate covers (self-signed only).
    pub names: Vec<String>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Loads or creates the certificate.
pub async fn setup(source: &TlsSource) -> Result<TlsSetup, TlsError> {
    // Both webrtc and our TLS use ring; install it once as rustls' process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cert, key, names) = match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), Vec::new()),
        TlsSource::SelfSigned { dir } => {
            let names = local_names();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !cert.is_file() || !key.is_file() {
                generate(&names, &cert, &key)?;
                tracing::info!(cert = %cert.display(), ?names, "generated a self-signed certificate");
            }
            (cert, key, names)
        }
    };
    let config = RustlsConfig::from_pem_file(&cert, &key)
        .await
        .map_err(io_error(&cert))?;
    Ok(TlsSetup {
        config,
        cert_path: cert,
        names,
    })
}

fn generate(names: &[String], cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let certified = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    // The key first and each file whole under its name (written aside, then renamed), so a
    // certificate in place always has its key, and a start cut short leaves no half file.
    write_whole(key_path, &certified.signing_key.serialize_pem(), true)?;
    write_whole(cert_path, &certified.cert.pem(), false)
}

/// Writes `text` to a file beside `path` (readable by its owner alone when `private`) and
/// renames it to `path`.
fn write_whole(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".partial");
    let aside = PathBuf::from(aside);
    std::fs::write(&aside, "").map_err(io_error(&aside))?;
    if private {
        restrict(&aside);
    }
    std::fs::write(&aside, text).map_err(io_error(&aside))?;
    std::fs::rename(&aside, path).map_err(io_error(path))
}

#[cfg(unix)]
fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict(_path: &Path) {}

/// localhost, the loopback addresses, the host name and the LAN address.
pub fn local_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        Ipv4Addr::LOCALHOST.to_string(),
        Ipv6Addr::LOCALHOST.to_string(),
    ];
    if let Some(host) = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
    {
        names.push(host);
    }
    if let Some(ip) = lan_address() {
        names.push(ip.to_string());
    }
    names.dedup();
    names
}

/// The address this machine uses to reach other networks (no packet is sent).
pub fn lan_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    socket
        .local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// Where self-signed certificates live by default.
pub fn default_dir() -> PathBuf {
    crate::cache_dir().join("tls")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generated pair lies whole under its names, nothing beside it, the key private.
    #[test]
    fn a_generated_pair_is_whole_and_its_key_private() {
        let dir = std::env::temp_dir().join(format!("duplex-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        generate(&["localhost".to_owned()], &cert, &key).unwrap();
        let text = |path: &Path| std::fs::read_to_string(path).unwrap();
        assert!(text(&cert).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(text(&key).contains("PRIVATE KEY-----"));
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["cert.pem", "key.pem"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
