//! Serving HBONE: accept CONNECT streams on an mTLS connection and hand each — with its destination and
//! the peer's verified identity — to a handler that opens the upstream and then accepts or refuses it.
use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};
use warren_identity::Identity;

use super::{CONNECTION_WINDOW, H2Stream, MAX_FRAME, STREAM_WINDOW};

/// A CONNECT the handler has not answered yet.
pub struct PendingTunnel {
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl PendingTunnel {
    /// Answers 200: the tunnel is open.
    pub fn accept(mut self) -> Result<H2Stream> {
        let send = self.respond.send_response(status(StatusCode::OK), false).context("answering CONNECT")?;
        Ok(H2Stream::new(send, self.body))
    }

    /// Answers with an error status and ends the stream.
    pub fn refuse(mut self, code: StatusCode) {
        let _ = self.respond.send_response(status(code), true);
    }
}

/// Serves one mTLS connection from `peer` until it closes: every CONNECT to `ip:port` goes to
/// `handle(destination, peer, tunnel)` on a task of its own; anything else is answered 400.
pub async fn serve<IO, H, F>(io: IO, peer: Identity, handle: H) -> Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Identity, PendingTunnel) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(io)
        .await
        .context("HBONE HTTP/2 handshake")?;
    let handle = Arc::new(handle);
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
        let tunnel = PendingTunnel { respond, body: request.into_body() };
        tokio::spawn(handle(destination, peer.clone(), tunnel));
    }
    Ok(())
}

fn status(code: StatusCode) -> Response<()> {
    Response::builder().status(code).body(()).expect("static response")
}
