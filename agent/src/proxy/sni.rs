//! The SNI of a TLS connection that is not terminated (PASSTHROUGH gateways, `tls` routes): the ClientHello
//! is read and parsed (rustls' `Acceptor`), and the bytes read are kept to be sent on first, unchanged.
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// A ClientHello larger than this is not waited for (they are a few hundred bytes; post-quantum key shares
/// a few KiB).
const MAX_CLIENT_HELLO: usize = 64 * 1024;
/// How long a client may take to send its ClientHello.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SniError {
    #[error("not TLS: {0}")]
    NotTls(rustls::Error),
    #[error("no ClientHello within {} KiB", MAX_CLIENT_HELLO / 1024)]
    TooLarge,
    #[error("no ClientHello within {}s", CLIENT_HELLO_TIMEOUT.as_secs())]
    Timeout,
    #[error("the client closed before its ClientHello")]
    Closed,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// The bytes read up to the end of the ClientHello, and its SNI (lower case) if it has one.
pub async fn read_client_hello<IO: AsyncRead + Unpin>(client: &mut IO) -> Result<(Vec<u8>, Option<String>), SniError> {
    tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read(client)).await.map_err(|_| SniError::Timeout)?
}

async fn read<IO: AsyncRead + Unpin>(client: &mut IO) -> Result<(Vec<u8>, Option<String>), SniError> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(SniError::Closed);
        }
        seen.extend_from_slice(&chunk[..n]);
        let mut fed = &chunk[..n];
        while !fed.is_empty() {
            acceptor.read_tls(&mut fed)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(|s| s.to_ascii_lowercase());
                return Ok((seen, sni));
            }
            Ok(None) if seen.len() < MAX_CLIENT_HELLO => continue,
            Ok(None) => return Err(SniError::TooLarge),
            Err((e, _alert)) => return Err(SniError::NotTls(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls' client for `host`.
    fn client_hello(host: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_sni_is_read_and_every_byte_kept() {
        let hello = client_hello("Api.Example.com");
        let mut stream = [hello.as_slice(), b"after"].concat();
        let (seen, sni) = read_client_hello(&mut stream.as_slice()).await.unwrap();
        assert_eq!(sni.as_deref(), Some("api.example.com"));
        assert!(seen.starts_with(&hello), "the ClientHello bytes, unchanged, to send on");
        stream.truncate(10);
        assert!(matches!(read_client_hello(&mut stream.as_slice()).await, Err(SniError::Closed)), "a cut ClientHello");
        // Control: plaintext HTTP is not TLS.
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(read_client_hello(&mut http.as_slice()).await, Err(SniError::NotTls(_))));
    }
}
