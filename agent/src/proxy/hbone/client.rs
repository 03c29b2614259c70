//! Opening HBONE streams: an HTTP/2 connection over an established mTLS stream, then one CONNECT per
//! tunnelled TCP connection.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, H2Stream, MAX_FRAME, STREAM_WINDOW};

/// Why a CONNECT did not open a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The peer answered, with another status than 200 (403: its AuthorizationPolicy refused us): the
    /// connection itself is fine, and asking again on a new one would get the same answer.
    #[error("HBONE CONNECT {destination}: peer answered {status}")]
    Refused { destination: SocketAddr, status: http::StatusCode },
    /// The HTTP/2 connection could not carry the request (it went away, or was reset).
    #[error("HBONE connection: {0}")]
    Connection(#[from] h2::Error),
}

/// An HTTP/2 connection to a peer's HBONE server; cheap to clone, shared by every stream to that peer.
#[derive(Clone)]
pub struct Connection {
    requests: SendRequest<Bytes>,
}

impl Connection {
    /// Runs the HTTP/2 handshake on `io` (an mTLS stream whose ALPN chose h2) and drives the connection
    /// on a task of its own.
    pub async fn handshake<IO>(io: IO) -> Result<Self>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (requests, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(io)
            .await
            .context("HBONE HTTP/2 handshake")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("HBONE connection ended: {e}");
            }
        });
        Ok(Connection { requests })
    }

    /// Opens a tunnel to `destination` (sent as `:authority`); fails unless the peer answers 200.
    pub async fn connect(&self, destination: SocketAddr) -> Result<H2Stream, ConnectError> {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(destination.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        let mut requests = self.requests.clone().ready().await?;
        let (response, send) = requests.send_request(request, false)?;
        let response = response.await?;
        if response.status() != http::StatusCode::OK {
            return Err(ConnectError::Refused { destination, status: response.status() });
        }
        Ok(H2Stream::new(send, response.into_body()))
    }
}
