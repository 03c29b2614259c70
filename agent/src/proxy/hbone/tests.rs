//! HBONE over real mTLS on loopback: tunnels are byte-exact with half-close, several share one
//! connection, the server learns the client's identity, and bad requests are refused. And the CONNECT's
//! wire form against a bare h2 peer over an in-memory pipe (h2 decodes, not Warren): the headers the
//! client sends, the authorities and headers the server takes or answers 400, the statuses it answers.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls::pki_types::ServerName};
use warren_api::workloads::Pod;
use warren_identity::{CertificateAuthority, Identity, tls};

use super::{
    client::{ConnectError, Connection, TunnelRequest},
    headers::{AuthorityError, Baggage, ForwardedFor, HboneAddress, TraceParent, WorkloadKind},
    server::{self, Connect},
};

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

/// An HBONE server on loopback that records every CONNECT; it tunnels to the `ip:port` named, and refuses
/// hostnames (it has no services).
async fn hbone_server(mesh: &Mesh) -> (SocketAddr, Arc<Mutex<Vec<Connect>>>) {
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
                server::serve(tls, peer, move |connect, tunnel| {
                    record.lock().unwrap().push(connect.clone());
                    async move {
                        let HboneAddress::Socket(destination) = connect.address else {
                            return tunnel.refuse(StatusCode::BAD_REQUEST);
                        };
                        match TcpStream::connect(destination).await {
                            Ok(upstream) => {
                                let stream = tunnel.accept(&Baggage::default()).unwrap();
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

/// A tunnel to `destination` for a client at 10.1.0.5:41000 that addressed no service, with no baggage.
fn to(destination: SocketAddr) -> TunnelRequest {
    TunnelRequest { destination, forwarded_for: client_at("10.1.0.5:41000"), service_host: None, baggage: Baggage::default() }
}

fn client_at(address: &str) -> ForwardedFor {
    let address: SocketAddr = address.parse().unwrap();
    ForwardedFor { ip: address.ip(), port: Some(address.port()) }
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
            let stream = connection.connect(&to(echo)).await.unwrap();
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
    assert!(
        seen.iter().all(|c| c.address == HboneAddress::Socket(echo) && c.peer == mesh.client_identity),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_failing_upstream_is_answered_503() {
    let mesh = mesh();
    let (server, _) = hbone_server(&mesh).await;
    let connection = connect(&mesh, server).await;
    // Nothing listens on port 9 of loopback.
    let error = connection.connect(&to("127.0.0.1:9".parse().unwrap())).await.err().unwrap();
    assert!(error.to_string().contains("503"), "{error:#}");
}

// ------------------------------------------------------------------------------------------------
// The client's CONNECT as a bare h2 server receives it
// ------------------------------------------------------------------------------------------------

/// A bare h2 server on one end of an in-memory pipe, answering every request `status`; the client's
/// [`Connection`] on the other end, and the requests' heads as h2 decoded them.
async fn capturing_peer(status: StatusCode) -> (Connection, mpsc::UnboundedReceiver<http::request::Parts>) {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let (seen, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut connection = h2::server::handshake(server_io).await.unwrap();
        let mut open = vec![];
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let _ = seen.send(request.into_parts().0);
            let answer = http::Response::builder().status(status).body(()).unwrap();
            // Kept, so an accepted tunnel stays open while the test looks at it.
            open.push(respond.send_response(answer, status != StatusCode::OK).ok());
        }
    });
    (Connection::handshake(client_io).await.unwrap(), received)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// `00-<32 hex>-<16 hex>-00`, lowercase, neither id all zeros (W3C trace context, version 00).
fn is_traceparent(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    parts.len() == 4
        && parts[0] == "00"
        && parts[3] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && nonzero(parts[1])
        && nonzero(parts[2])
}

fn full_baggage() -> Baggage {
    Baggage {
        cluster: Some("Kubernetes".into()),
        namespace: Some("shop".into()),
        workload: Some((WorkloadKind::Deployment, "reviews-v1".into())),
        service: Some("reviews".into()),
        version: Some("v1".into()),
        region: Some("eu-west".into()),
        zone: Some("eu-west-1a".into()),
    }
}

#[tokio::test]
async fn a_connect_carries_forwarded_baggage_and_traceparent() {
    let (connection, mut seen) = capturing_peer(StatusCode::OK).await;
    let destination: SocketAddr = "10.2.0.7:9080".parse().unwrap();
    let to_service = TunnelRequest {
        service_host: Some("reviews.shop.svc.cluster.local".into()),
        baggage: full_baggage(),
        ..to(destination)
    };
    let _open = connection.connect(&to_service).await.unwrap();
    let sent = seen.recv().await.unwrap();
    assert_eq!((sent.method.clone(), sent.uri.to_string()), (Method::CONNECT, "10.2.0.7:9080".to_string()));
    assert_eq!(header(&sent.headers, "forwarded"), Some(r#"for="10.1.0.5:41000";host=reviews.shop.svc.cluster.local"#));
    assert_eq!(
        header(&sent.headers, "baggage"),
        Some(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=reviews-v1,service.name=reviews,\
             service.version=v1,cloud.region=eu-west,cloud.availability_zone=eu-west-1a"
        )
    );
    let first_trace = header(&sent.headers, "traceparent").unwrap().to_string();
    assert!(is_traceparent(&first_trace), "{first_trace}");

    // Control: a workload addressed directly, nothing known of the source — no host, no baggage; and each
    // CONNECT its own trace.
    let _open = connection.connect(&to(destination)).await.unwrap();
    let sent = seen.recv().await.unwrap();
    assert_eq!(header(&sent.headers, "forwarded"), Some(r#"for="10.1.0.5:41000""#));
    assert_eq!(header(&sent.headers, "baggage"), None);
    let second_trace = header(&sent.headers, "traceparent").unwrap();
    assert!(is_traceparent(second_trace) && second_trace != first_trace, "{first_trace} then {second_trace}");
}

#[tokio::test]
async fn forwarded_names_v6_clients_and_pooled_clients_without_a_port() {
    let (connection, mut seen) = capturing_peer(StatusCode::OK).await;
    let v6 = TunnelRequest { forwarded_for: client_at("[fd00::5]:41000"), ..to("[fd00::7]:9080".parse().unwrap()) };
    let _open = connection.connect(&v6).await.unwrap();
    assert_eq!(header(&seen.recv().await.unwrap().headers, "forwarded"), Some(r#"for="[fd00::5]:41000""#));
    // The L7 proxy's pooled connections: the pod, no port.
    let pooled = TunnelRequest { forwarded_for: ForwardedFor { ip: "fd00::5".parse().unwrap(), port: None }, ..v6.clone() };
    let _open = connection.connect(&pooled).await.unwrap();
    assert_eq!(header(&seen.recv().await.unwrap().headers, "forwarded"), Some(r#"for="[fd00::5]""#));
    let pod_v4 = ForwardedFor { ip: "10.1.0.5".parse().unwrap(), port: None };
    let pooled_v4 = TunnelRequest { forwarded_for: pod_v4, ..to("10.2.0.7:80".parse().unwrap()) };
    let _open = connection.connect(&pooled_v4).await.unwrap();
    assert_eq!(header(&seen.recv().await.unwrap().headers, "forwarded"), Some(r#"for="10.1.0.5""#));
    // A hostname that is not a DNS name is not sent (a peer's parser would choke on it).
    let odd = TunnelRequest { service_host: Some("not a host;x=1".into()), ..to("10.2.0.7:80".parse().unwrap()) };
    let _open = connection.connect(&odd).await.unwrap();
    assert_eq!(header(&seen.recv().await.unwrap().headers, "forwarded"), Some(r#"for="10.1.0.5:41000""#));
}

#[tokio::test]
async fn the_peers_refusal_is_reported_with_its_status() {
    for (status, shown) in [(StatusCode::UNAUTHORIZED, "401 Unauthorized"), (StatusCode::BAD_REQUEST, "400 Bad Request")] {
        let (connection, _seen) = capturing_peer(status).await;
        let refused = connection.connect(&to("10.2.0.7:80".parse().unwrap())).await.err().unwrap();
        assert!(matches!(refused, ConnectError::Refused { status: s, .. } if s == status), "{refused:?}");
        assert!(refused.to_string().contains(shown), "{refused}");
    }
    // Control: a 200 opens the tunnel.
    let (connection, _seen) = capturing_peer(StatusCode::OK).await;
    assert!(connection.connect(&to("10.2.0.7:80".parse().unwrap())).await.is_ok());
}

fn pod(name: &str, workload: Option<&str>, labels: &[(&str, &str)]) -> Pod {
    Pod {
        name: name.into(),
        namespace: "shop".into(),
        uid: "u".into(),
        ips: vec!["10.1.0.5".parse().unwrap()],
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        host_network: false,
        service_account: "reviews".into(),
        node: None,
        workload: workload.map(str::to_string),
        locality: None,
    }
}

fn baggage_text(pod: &Pod, cluster: &str) -> String {
    Baggage::of(pod, cluster).header().map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[test]
fn baggage_names_the_workload_as_istio_names_it_for_ztunnel() {
    let mut deployment = pod(
        "reviews-v1-7d4b9c8f6-x2x4p",
        Some("reviews-v1"),
        &[("app", "reviews"), ("version", "v1"), ("pod-template-hash", "7d4b9c8f6")],
    );
    deployment.locality = Some("eu-west/eu-west-1a/rack-3".into());
    assert_eq!(
        baggage_text(&deployment, "Kubernetes"),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=reviews-v1,service.name=reviews,\
         service.version=v1,cloud.region=eu-west,cloud.availability_zone=eu-west-1a"
    );
    // A CronJob's pod (its Job's name has the schedule suffix), a Job's, a StatefulSet's (by itself, as
    // Istio names every other kind), a bare pod without labels (canonical service: its name; revision:
    // latest).
    let cron = pod("nightly-28901234-abcde", Some("nightly"), &[("job-name", "nightly-28901234")]);
    assert!(baggage_text(&cron, "c").contains(",k8s.cronjob.name=nightly,"), "{}", baggage_text(&cron, "c"));
    let job = pod("migrate-1-abcde", Some("migrate-1"), &[("batch.kubernetes.io/job-name", "migrate-1")]);
    assert!(baggage_text(&job, "c").contains(",k8s.job.name=migrate-1,"), "{}", baggage_text(&job, "c"));
    let stateful = pod("db-0", Some("db"), &[("app", "db")]);
    assert!(baggage_text(&stateful, "c").contains(",k8s.pod.name=db-0,service.name=db,"), "{}", baggage_text(&stateful, "c"));
    let bare = pod("standalone", None, &[]);
    assert_eq!(
        baggage_text(&bare, "c"),
        "k8s.cluster.name=c,k8s.namespace.name=shop,k8s.pod.name=standalone,service.name=standalone,service.version=latest"
    );
    // The locality from the pod's label when the source resolved none.
    let labelled = pod("p", None, &[("istio-locality", "us-east.us-east-1b")]);
    assert!(baggage_text(&labelled, "c").ends_with(",cloud.region=us-east,cloud.availability_zone=us-east-1b"));
    // A value a peer could not read back unescaped is left out (control: the same cluster name without
    // the space is sent).
    assert!(!baggage_text(&bare, "my cluster").contains("k8s.cluster.name"));
    assert!(baggage_text(&bare, "my-cluster").starts_with("k8s.cluster.name=my-cluster,"));
    assert_eq!(Baggage::default().header(), None, "nothing known: no header");
}

// ------------------------------------------------------------------------------------------------
// The server's reading of a CONNECT, from a bare h2 client
// ------------------------------------------------------------------------------------------------

/// Warren's HBONE server on one end of a pipe; a bare h2 client on the other. The handler opens a tunnel
/// to `10.2.0.7:9080` and to `web.shop.svc.cluster.local:80` (answering 200 with baggage), answers 503 for
/// any other hostname (as ztunnel does for one it cannot find) and 400 for any other address; every
/// CONNECT it was handed is recorded.
async fn bare_client() -> (h2::client::SendRequest<Bytes>, Arc<Mutex<Vec<Connect>>>) {
    let (client_io, server_io): (DuplexStream, DuplexStream) = tokio::io::duplex(1 << 16);
    let seen = Arc::new(Mutex::new(vec![]));
    let record = seen.clone();
    let peer = Identity::new("cluster.local", "a", "client");
    tokio::spawn(server::serve(server_io, peer, move |connect, tunnel| {
        record.lock().unwrap().push(connect.clone());
        async move {
            let here = match &connect.address {
                HboneAddress::Socket(socket) => socket.to_string() == "10.2.0.7:9080",
                HboneAddress::Service { host, port } if host == "web.shop.svc.cluster.local" => *port == 80,
                HboneAddress::Service { .. } => return tunnel.refuse(StatusCode::SERVICE_UNAVAILABLE),
            };
            if !here {
                return tunnel.refuse(StatusCode::BAD_REQUEST);
            }
            let mut stream = tunnel.accept(&full_baggage()).unwrap();
            let _ = stream.write_all(b"hello").await;
            let _ = stream.shutdown().await;
        }
    }));
    let (requests, connection) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(connection);
    (requests, seen)
}

/// Sends `request`; the status and headers answered.
async fn send(requests: &h2::client::SendRequest<Bytes>, request: Request<()>) -> (StatusCode, HeaderMap) {
    let mut requests = requests.clone().ready().await.unwrap();
    let (response, _body) = requests.send_request(request, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("an answer").unwrap();
    (response.status(), response.headers().clone())
}

fn connect_to(authority: &str) -> http::request::Builder {
    Request::builder().method(Method::CONNECT).uri(authority)
}

#[tokio::test]
async fn a_hostname_authority_reaches_the_handler_and_the_200_carries_baggage() {
    let (requests, seen) = bare_client().await;
    let (status, headers) = send(&requests, connect_to("web.shop.svc.cluster.local:80").body(()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(header(&headers, "baggage").is_some_and(|b| b.contains("k8s.deployment.name=reviews-v1")), "{headers:?}");
    let recorded = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(recorded.address, HboneAddress::Service { host: "web.shop.svc.cluster.local".into(), port: 80 });
    // Hostnames compare as DNS does: in any case.
    let (status, _) = send(&requests, connect_to("Web.Shop.svc.cluster.local:80").body(()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    // Controls: a hostname the handler does not know is its 503, with no baggage; the address form still
    // works.
    let (status, headers) = send(&requests, connect_to("nosuch.shop.svc.cluster.local:80").body(()).unwrap()).await;
    assert_eq!((status, header(&headers, "baggage")), (StatusCode::SERVICE_UNAVAILABLE, None));
    let (status, _) = send(&requests, connect_to("10.2.0.7:9080").body(()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_authorities_are_answered_400_before_any_handler() {
    let (requests, seen) = bare_client().await;
    let long = format!("{}.svc.cluster.local:80", "a".repeat(250));
    let malformed = [
        "web.shop.svc.cluster.local", // a hostname without port
        "10.2.0.7",                   // an address without port
        "10.2.0.7:0",                 // port 0
        "web.shop.svc.cluster.local:0",
        "web.shop.svc.cluster.local:70000", // not a port
        long.as_str(),                // longer than any DNS name
        "web_shop!:80",               // not a DNS name
        "-:80",
    ];
    for authority in malformed {
        let (status, _) = send(&requests, connect_to(authority).body(()).unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{authority}");
    }
    // Not a CONNECT: 400 too.
    let get = Request::builder().method(Method::GET).uri("https://10.2.0.7:9080/").body(()).unwrap();
    assert_eq!(send(&requests, get).await.0, StatusCode::BAD_REQUEST);
    assert!(seen.lock().unwrap().is_empty(), "no handler saw any: {:?}", seen.lock().unwrap());
    // Control: the well-formed forms of the same reach the handler.
    for authority in ["web.shop.svc.cluster.local:80", "10.2.0.7:9080"] {
        assert_eq!(send(&requests, connect_to(authority).body(()).unwrap()).await.0, StatusCode::OK, "{authority}");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[test]
fn authorities_parse_into_addresses_and_hostnames_or_say_why_not() {
    let socket = |s: &str| Ok(HboneAddress::Socket(s.parse().unwrap()));
    let service = |host: &str, port| Ok(HboneAddress::Service { host: host.into(), port });
    assert_eq!(HboneAddress::parse("10.2.0.7:9080"), socket("10.2.0.7:9080"));
    assert_eq!(HboneAddress::parse("[fd00::7]:9080"), socket("[fd00::7]:9080"));
    assert_eq!(HboneAddress::parse("Web.Shop.svc.cluster.local:80"), service("web.shop.svc.cluster.local", 80));
    assert_eq!(HboneAddress::parse("_grpc._tcp.example.com:443"), service("_grpc._tcp.example.com", 443));
    let no_port = |s: &str| Err(AuthorityError::NoPort(s.into()));
    let bad_port = |s: &str| Err(AuthorityError::BadPort(s.into()));
    let bad_host = |s: &str| Err(AuthorityError::BadHost(s.into()));
    assert_eq!(HboneAddress::parse("web"), no_port("web"));
    assert_eq!(HboneAddress::parse("10.2.0.7:0"), bad_port("10.2.0.7:0"));
    assert_eq!(HboneAddress::parse("web:0"), bad_port("web:0"));
    assert_eq!(HboneAddress::parse("web:"), bad_port("web:"));
    assert_eq!(HboneAddress::parse("web:65536"), bad_port("web:65536"));
    assert_eq!(HboneAddress::parse("[fd00::7]"), bad_port("[fd00::7]"));
    assert_eq!(HboneAddress::parse("fd00::7"), bad_host("fd00::7"));
    assert_eq!(HboneAddress::parse("10.2.0.256:80"), bad_host("10.2.0.256:80"), "not an address, nor a name");
    assert_eq!(HboneAddress::parse("wéb:80"), bad_host("wéb:80"));
    assert_eq!(HboneAddress::parse("a..b:80"), bad_host("a..b:80"));
    assert_eq!(HboneAddress::parse(&format!("{}:80", "a".repeat(64))), bad_host(&format!("{}:80", "a".repeat(64))));
    let long = format!("{}:80", vec!["a".repeat(63); 5].join("."));
    assert_eq!(HboneAddress::parse(&long), Err(AuthorityError::TooLong(long.len())));
    assert_eq!(HboneAddress::parse(""), no_port(""));
}

#[tokio::test]
async fn forwarded_host_and_traceparent_are_read_when_well_formed_and_ignored_otherwise() {
    let (requests, seen) = bare_client().await;
    let with = |name: &str, value: HeaderValue| connect_to("10.2.0.7:9080").header(name, value).body(()).unwrap();
    let text = |s: &str| HeaderValue::from_str(s).unwrap();
    let cases: Vec<(HeaderValue, Option<&str>)> = vec![
        (text(r#"for="10.1.0.5:41000";host=web.shop.svc.cluster.local"#), Some("web.shop.svc.cluster.local")),
        (text(r#"for="10.1.0.5:41000";host="web.shop.svc.cluster.local:80""#), Some("web.shop.svc.cluster.local:80")),
        (text(r#"by=x;for=y;HOST=Web.Shop;proto=https"#), Some("web.shop")),
        // Control for all below: ztunnel's own form without host.
        (text(r#"for="10.1.0.5:41000""#), None),
        (text(";;==,\";host=;host"), None),
        (text("host=\"unterminated"), None),
        (text("host=a b c"), None),
        (HeaderValue::from_bytes("for=\"10.1.0.5:1\";host=wéb.shop".as_bytes()).unwrap(), None),
        (HeaderValue::from_bytes(b"host=\xff\xfe").unwrap(), None),
    ];
    for (value, expected) in &cases {
        let (status, _) = send(&requests, with("forwarded", value.clone())).await;
        let recorded = seen.lock().unwrap().last().cloned().unwrap();
        // Whatever the header says, the tunnel opens: it only ever names a service.
        assert_eq!((status, recorded.forwarded_host.as_deref()), (StatusCode::OK, *expected), "{value:?}");
    }
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let (status, _) = send(&requests, with("traceparent", text(trace))).await;
    let recorded = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(recorded.trace.map(|t| t.to_string()).as_deref(), Some(trace));
    let garbage = [
        "00-zz-b7ad6b7169203331-00",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", // a version this reader does not know
        "00-00000000000000000000000000000000-b7ad6b7169203331-00", // an all-zero trace id
        "ü",
    ];
    for garbage in garbage {
        let value = HeaderValue::from_bytes(garbage.as_bytes()).unwrap();
        let (status, _) = send(&requests, with("traceparent", value)).await;
        let recorded = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!((status, recorded.trace), (StatusCode::OK, None), "{garbage}");
    }
    // A baggage header full of junk is not the server's business either.
    let (status, _) = send(&requests, with("baggage", HeaderValue::from_bytes(b"==,,\xff;k8s.").unwrap())).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn a_random_traceparent_reads_back() {
    let trace = TraceParent::random();
    assert!(is_traceparent(&trace.to_string()), "{trace}");
    assert_eq!(TraceParent::parse(&trace.header()), Some(trace));
    assert_ne!(TraceParent::random(), trace, "fresh ids each time");
}
