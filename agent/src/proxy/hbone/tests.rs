//! HBONE over real mTLS on loopback: tunnels are byte-exact with half-close, several share one
//! connection, the server learns the client's identity, and bad requests are refused.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls::pki_types::ServerName};
use warren_identity::{CertificateAuthority, Identity, tls};

use super::{client::Connection, server};

struct Mesh {
    server_tls: Arc<rustls::ServerConfig>,
    client_tls: Arc<rustls::ClientConfig>,
    client_identity: Identity,
}

fn mesh() -> Mesh {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let bundle = tls::TrustBundle::from_pem("cluster.local", ca.root_pem()).unwrap();
    let (server_id, client_id) = (Identity::new("cluster.local", "b", "server"), Identity::new("cluster.local", "a", "client"));
    let server_cert = ca.issue(&server_id, Duration::from_secs(3600), SystemTime::now()).unwrap();
    let client_cert = ca.issue(&client_id, Duration::from_secs(3600), SystemTime::now()).unwrap();
    Mesh {
        server_tls: Arc::new(tls::server_config(&server_cert, server_cert.key_pem.as_ref().unwrap(), &bundle).unwrap()),
        client_tls: Arc::new(
            tls::client_config(&client_cert, client_cert.key_pem.as_ref().unwrap(), &bundle, vec![server_id]).unwrap(),
        ),
        client_identity: client_id,
    }
}

/// An echo server standing in for the destination workload.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HBONE server on loopback that records (destination, peer identity) of every stream.
async fn hbone_server(mesh: &Mesh) -> (SocketAddr, Arc<Mutex<Vec<(SocketAddr, Identity)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(vec![]));
    let acceptor = TlsAcceptor::from(mesh.server_tls.clone());
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let peer = tls::peer_identity(tls.get_ref().1).unwrap();
                server::serve(tls, peer, move |destination, peer, tunnel| {
                    record.lock().unwrap().push((destination, peer));
                    async move {
                        match TcpStream::connect(destination).await {
                            Ok(upstream) => {
                                let stream = tunnel.accept().unwrap();
                                let _ = crate::proxy::copy::copy_bidirectional(stream, upstream).await;
                            }
                            Err(_) => tunnel.refuse(http::StatusCode::SERVICE_UNAVAILABLE),
                        }
                    }
                })
                .await
                .unwrap();
            });
        }
    });
    (addr, seen)
}

async fn connect(mesh: &Mesh, server: SocketAddr) -> Connection {
    let tcp = TcpStream::connect(server).await.unwrap();
    let tls = TlsConnector::from(mesh.client_tls.clone()).connect(ServerName::try_from("hbone").unwrap(), tcp).await.unwrap();
    Connection::handshake(tls).await.unwrap()
}

#[tokio::test]
async fn tunnels_are_byte_exact_share_one_connection_and_carry_identity() {
    let mesh = mesh();
    let echo = echo_server().await;
    let (server, seen) = hbone_server(&mesh).await;
    let connection = connect(&mesh, server).await;

    let mut tasks = vec![];
    for i in 0..4u8 {
        let connection = connection.clone();
        tasks.push(tokio::spawn(async move {
            let stream = connection.connect(echo).await.unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let payload: Vec<u8> = (0..3_000_000u32).map(|n| (n as u8).wrapping_mul(i + 1)).collect();
            let expected = payload.clone();
            let writer = tokio::spawn(async move {
                write.write_all(&payload).await.unwrap();
                write.shutdown().await.unwrap(); // half-close: END_STREAM, the echo server sees EOF
            });
            let mut echoed = vec![];
            read.read_to_end(&mut echoed).await.unwrap();
            writer.await.unwrap();
            assert!(echoed == expected, "stream {i}: {} bytes back, content differs", echoed.len());
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|(destination, peer)| *destination == echo && *peer == mesh.client_identity), "{seen:?}");
}

#[tokio::test]
async fn a_failing_upstream_is_answered_503() {
    let mesh = mesh();
    let (server, _) = hbone_server(&mesh).await;
    let connection = connect(&mesh, server).await;
    // Nothing listens on port 9 of loopback.
    let error = connection.connect("127.0.0.1:9".parse().unwrap()).await.err().unwrap();
    assert!(error.to_string().contains("503"), "{error:#}");
}
