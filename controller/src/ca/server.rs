//! The CA's HTTPS endpoint: `POST /v1/certificates` with `Authorization: Bearer <agent token>` and
//! `{"identity": "spiffe://…", "csr": "<PEM>"}` → `{"identity", "serial", "chain": [PEM…], "notAfterUnix"}`;
//! refusals answer 400/401/403 with `{"error": "…"}` naming the reason.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use warren_identity::{CertificateAuthority, Identity};

use super::authorize::{Authorizer, Refusal};
use crate::metrics::Metrics;

/// A CSR is a few hundred bytes; anything much larger is not one.
const MAX_BODY: usize = 64 * 1024;

#[derive(Deserialize)]
struct CertificateRequest {
    identity: String,
    csr: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateResponse {
    identity: String,
    serial: String,
    chain: Vec<String>,
    not_after_unix: u64,
}

pub struct CaService {
    pub ca: CertificateAuthority,
    pub authorizer: Authorizer,
    pub lifetime: Duration,
    pub metrics: Arc<Metrics>,
}

/// The controller's own identity (what agents expect when they connect).
pub fn controller_identity(trust_domain: &str, namespace: &str) -> Identity {
    Identity::new(trust_domain, namespace, "warren-controller")
}

pub async fn serve(listener: TcpListener, service: Arc<CaService>, identity: Identity) -> Result<()> {
    let serving = service.ca.issue(&identity, Duration::from_secs(365 * 24 * 3600), std::time::SystemTime::now())?;
    let config = warren_identity::tls::server_config_without_client_auth(&serving, serving.key_pem.as_deref().expect("generated"))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    info!(addr = ?listener.local_addr().ok(), identity = %identity, "CA service ready");
    loop {
        let (tcp, peer) = listener.accept().await.context("accepting")?;
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let handler = service_fn(move |req| handle(req, service.clone(), peer));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(tls), handler).await;
        });
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

fn refuse(status: u16, message: String) -> Response<Full<Bytes>> {
    reply(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), serde_json::json!({ "error": message }))
}

async fn handle(req: Request<Incoming>, service: Arc<CaService>, peer: SocketAddr) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/certificates" {
        // Not a certificate request: neither issued nor refused.
        return Ok(refuse(404, "POST /v1/certificates".into()));
    }
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(token) = token else {
        return Ok(answer(&service, Err(Refusal::NoToken)));
    };
    let certified = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => certify(&service, &token, &body.to_bytes(), peer).await,
        Err(e) => Err(Refusal::BadRequest(format!("body: {e}"))),
    };
    Ok(answer(&service, certified))
}

/// The answer to a certificate request, counted as issued or refused (by reason).
fn answer(service: &CaService, certified: Result<CertificateResponse, Refusal>) -> Response<Full<Bytes>> {
    match certified {
        Ok(response) => {
            service.metrics.certificate_issued();
            reply(StatusCode::OK, serde_json::to_value(response).expect("serializable"))
        }
        Err(refusal) => {
            service.metrics.certificate_refused(refusal.reason());
            refuse(refusal.status(), refusal.to_string())
        }
    }
}

/// Checks the token and the identity it asks for, then signs the CSR for that identity.
async fn certify(service: &CaService, token: &str, body: &[u8], peer: SocketAddr) -> Result<CertificateResponse, Refusal> {
    let request: CertificateRequest =
        serde_json::from_slice(body).map_err(|e| Refusal::BadRequest(format!("body: {e}")))?;
    let identity: Identity = request.identity.parse().map_err(|e| Refusal::BadRequest(format!("identity: {e}")))?;
    let node = service.authorizer.node_of(token).await.inspect_err(|refusal| {
        warn!(%peer, identity = %identity, "certificate refused: {refusal}");
    })?;
    service.authorizer.authorize(&node, &identity).await.inspect_err(|refusal| {
        warn!(%peer, node, identity = %identity, "certificate refused: {refusal}");
    })?;
    let cert = service
        .ca
        .sign_csr(&request.csr, &identity, service.lifetime)
        .map_err(|e| Refusal::BadRequest(format!("csr: {e}")))?;
    info!(node, identity = %identity, serial = %cert.serial, "certificate issued");
    let not_after_unix = cert.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(CertificateResponse { identity: identity.to_string(), serial: cert.serial, chain: cert.chain_pem, not_after_unix })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::sample;

    /// The three API calls the authorizer makes, answered as an API server would for one agent pod
    /// (`agent-1` on node `n1`, token `good`) and one workload pod on n1 (shop/reviews).
    fn api_server(method: &hyper::Method, uri: &hyper::Uri, body: &[u8]) -> serde_json::Value {
        let token_review = |authenticated: bool| {
            let user = serde_json::json!({
                "username": "system:serviceaccount:warren-system:warren-agent",
                "extra": {"authentication.kubernetes.io/pod-name": ["agent-1"], "authentication.kubernetes.io/pod-uid": ["uid-1"]},
            });
            serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {},
                "status": {"authenticated": authenticated, "user": user}})
        };
        let on_n1 = uri.query().is_some_and(|q| q.contains("spec.nodeName%3Dn1"));
        match (method.as_str(), uri.path()) {
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
                let review: serde_json::Value = serde_json::from_slice(body).unwrap();
                token_review(review["spec"]["token"] == "good")
            }
            ("GET", "/api/v1/namespaces/warren-system/pods/agent-1") => serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "agent-1", "namespace": "warren-system", "uid": "uid-1"},
                "spec": {"nodeName": "n1", "containers": []}}),
            ("GET", "/api/v1/namespaces/shop/pods") if on_n1 => serde_json::json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {}, "items": [{"metadata": {"name": "reviews-v1", "namespace": "shop"},
                "spec": {"nodeName": "n1", "serviceAccountName": "reviews", "containers": []}}]}),
            _ => panic!("unexpected API call {method} {uri}"),
        }
    }

    async fn fake_api_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let handler = service_fn(|req: Request<Incoming>| async move {
                    let (method, uri) = (req.method().clone(), req.uri().clone());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(reply(StatusCode::OK, api_server(&method, &uri, &body)))
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(tcp), handler));
            }
        });
        addr
    }

    fn request(identity: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        serde_json::json!({"identity": identity, "csr": csr}).to_string().into_bytes()
    }

    #[tokio::test]
    async fn issued_and_refused_certificates_are_counted_by_reason() {
        let api = fake_api_server().await;
        let client = kube::Client::try_from(kube::Config::new(format!("http://{api}").parse().unwrap())).unwrap();
        let service = CaService {
            ca: CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap(),
            authorizer: Authorizer {
                client,
                agent_namespace: "warren-system".into(),
                agent_service_account: "warren-agent".into(),
                trust_domain: "cluster.local".into(),
            },
            lifetime: Duration::from_secs(600),
            metrics: Arc::default(),
        };
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let reviews = request("spiffe://cluster.local/ns/shop/sa/reviews");
        let status = |certified| answer(&service, certified).status().as_u16();

        assert_eq!(status(certify(&service, "good", &reviews, peer).await), 200);
        assert_eq!(status(certify(&service, "bad", &reviews, peer).await), 401);
        // No pod on n1 runs as ratings.
        assert_eq!(status(certify(&service, "good", &request("spiffe://cluster.local/ns/shop/sa/ratings"), peer).await), 403);
        assert_eq!(status(certify(&service, "good", b"{", peer).await), 400);
        assert_eq!(status(Err(Refusal::NoToken)), 401);

        let text = service.metrics.encode().unwrap();
        let refused = |reason: &str| sample(&text, &format!("warren_controller_certificate_requests_refused_total{{reason=\"{reason}\"}}"));
        assert_eq!(sample(&text, "warren_controller_certificates_issued_total"), Some(1.0), "{text}");
        assert_eq!(refused("unauthenticated"), Some(2.0), "{text}");
        assert_eq!(refused("forbidden"), Some(1.0), "{text}");
        assert_eq!(refused("bad_request"), Some(1.0), "{text}");
        assert_eq!(refused("internal"), Some(0.0), "{text}");
    }
}
