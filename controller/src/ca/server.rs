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

use super::authorize::Authorizer;

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
        return Ok(refuse(404, "POST /v1/certificates".into()));
    }
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(token) = token else {
        return Ok(refuse(401, "Authorization: Bearer <service account token> is required".into()));
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return Ok(refuse(400, format!("body: {e}"))),
    };
    let request: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return Ok(refuse(400, format!("body: {e}"))),
    };
    let identity: Identity = match request.identity.parse() {
        Ok(id) => id,
        Err(e) => return Ok(refuse(400, format!("identity: {e}"))),
    };
    let node = match service.authorizer.node_of(&token).await {
        Ok(node) => node,
        Err(refusal) => {
            warn!(%peer, identity = %identity, "certificate refused: {refusal}");
            return Ok(refuse(refusal.status(), refusal.to_string()));
        }
    };
    if let Err(refusal) = service.authorizer.authorize(&node, &identity).await {
        warn!(%peer, node, identity = %identity, "certificate refused: {refusal}");
        return Ok(refuse(refusal.status(), refusal.to_string()));
    }
    match service.ca.sign_csr(&request.csr, &identity, service.lifetime) {
        Ok(cert) => {
            info!(node, identity = %identity, serial = %cert.serial, "certificate issued");
            let not_after_unix =
                cert.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let response = CertificateResponse { identity: identity.to_string(), serial: cert.serial, chain: cert.chain_pem, not_after_unix };
            Ok(reply(StatusCode::OK, serde_json::to_value(response).expect("serializable")))
        }
        Err(e) => Ok(refuse(400, format!("csr: {e}"))),
    }
}
