//! Serving HBONE: accept CONNECT streams on an mTLS connection and hand each — with its destination and
//! the peer's verified identity — to a connector that opens the connection to the workload.
use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};
use warren_identity::Identity;

use super::{CONNECTION_WINDOW, H2Stream, MAX_FRAME, STREAM_WINDOW};
use crate::proxy::copy;

/// Serves one mTLS connection from `peer` until it closes. For each CONNECT, `connect(destination,
/// peer)` opens the upstream; the stream is answered 200 and copied both ways, or refused with
/// 400 (not a CONNECT to ip:port) / 503 (upstream failed).
pub async fn serve<IO, C, F, U>(io: IO, peer: Identity, connect: C) -> Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Fn(SocketAddr, Identity) -> F + Send + Sync + 'static,
    F: Future<Output = Result<U>> + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(io)
        .await
        .context("HBONE HTTP/2 handshake")?;
    let connect = Arc::new(connect);
    while let Some(request) = connection.accept().await {
        let (request, mut respond) = match request {
            Ok(r) => r,
            Err(e) => {
                debug!(peer = %peer, "HBONE connection ended: {e}");
                break;
            }
        };
        let destination = (request.method() == Method::CONNECT)
            .then(|| request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()))
            .flatten();
        let Some(destination) = destination else {
            warn!(peer = %peer, method = %request.method(), uri = %request.uri(), "HBONE: not a CONNECT to ip:port");
            let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
            continue;
        };
        let (connect, peer) = (connect.clone(), peer.clone());
        tokio::spawn(async move {
            let upstream = match connect(destination, peer.clone()).await {
                Ok(upstream) => upstream,
                Err(e) => {
                    warn!(peer = %peer, destination = %destination, "HBONE: upstream failed: {e:#}");
                    let _ = respond.send_response(status(StatusCode::SERVICE_UNAVAILABLE), true);
                    return;
                }
            };
            let Ok(send) = respond.send_response(status(StatusCode::OK), false) else { return };
            let tunnel = H2Stream::new(send, request.into_body());
            let (transferred, error) = copy::copy_bidirectional(tunnel, upstream).await;
            debug!(peer = %peer, destination = %destination, ?transferred, ?error, "HBONE stream closed");
        });
    }
    Ok(())
}

fn status(code: StatusCode) -> Response<()> {
    Response::builder().status(code).body(()).expect("static response")
}
