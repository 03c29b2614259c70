//! Why a request did not get the upstream's answer: each cause has the status, body and response flag
//! Envoy (and so Istio) gives it, so clients and dashboards see what they would see under Istio.
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::{Body, flags::Flag, full};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VirtualService has `http` rules and none takes the request.
    #[error("no route matches {0}")]
    NoRoute(String),
    /// The chosen service or subset has no endpoint.
    #[error("no healthy upstream: {0}")]
    NoHealthyUpstream(String),
    #[error("upstream connect error: {0}")]
    UpstreamConnect(String),
    /// The connection broke before a response came.
    #[error("upstream reset before response: {0}")]
    UpstreamReset(String),
    /// The HTTP/2 upstream refused the stream (REFUSED_STREAM: nothing was processed, always safe to retry).
    #[error("upstream refused the stream: {0}")]
    UpstreamRefused(String),
    /// A connection pool limit of the (service, subset, port) is full (`connectionPool`).
    #[error("upstream overflow: {0}")]
    Overflow(String),
    #[error("upstream request timeout after {0:?}")]
    UpstreamTimeout(Duration),
    /// `fault.abort.httpStatus`.
    #[error("fault injected: abort with HTTP {0}")]
    FaultAbort(StatusCode),
    /// `fault.abort.grpcStatus` (its numeric code).
    #[error("fault injected: abort with gRPC status {0}")]
    FaultAbortGrpc(u32),
    /// An AuthorizationPolicy refused the request.
    #[error("RBAC: access denied")]
    Denied,
    /// The request cannot be forwarded as it is (e.g. a rewrite made its URI invalid).
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("request body over the mirror buffer of {0} bytes")]
    TooLarge(usize),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoRoute(_) => StatusCode::NOT_FOUND,
            Error::NoHealthyUpstream(_)
            | Error::UpstreamConnect(_)
            | Error::UpstreamReset(_)
            | Error::UpstreamRefused(_)
            | Error::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::FaultAbort(status) => *status,
            Error::FaultAbortGrpc(_) => StatusCode::OK,
            Error::Denied => StatusCode::FORBIDDEN,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// Envoy's response flag for the cause (what Istio's access logs and metrics carry).
    pub fn flag(&self) -> Flag {
        match self {
            Error::NoRoute(_) => Flag::NoRoute,
            Error::NoHealthyUpstream(_) => Flag::NoHealthyUpstream,
            Error::UpstreamConnect(_) => Flag::UpstreamConnectFailure,
            Error::UpstreamReset(_) => Flag::UpstreamConnectionTermination,
            Error::UpstreamRefused(_) => Flag::UpstreamRemoteReset,
            Error::Overflow(_) => Flag::UpstreamOverflow,
            Error::UpstreamTimeout(_) => Flag::UpstreamTimeout,
            Error::FaultAbort(_) | Error::FaultAbortGrpc(_) => Flag::FaultInjected,
            Error::Denied => Flag::Rbac,
            Error::BadRequest(_) | Error::TooLarge(_) => Flag::DownstreamProtocolError,
        }
    }

    /// The body Envoy answers with.
    fn body(&self) -> &'static str {
        match self {
            Error::NoRoute(_) | Error::BadRequest(_) | Error::TooLarge(_) | Error::FaultAbortGrpc(_) => "",
            Error::NoHealthyUpstream(_) => "no healthy upstream",
            Error::UpstreamConnect(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Error::UpstreamReset(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            Error::UpstreamRefused(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"
            }
            Error::Overflow(_) => "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            Error::UpstreamTimeout(_) => "upstream request timeout",
            Error::FaultAbort(_) => "fault filter abort",
            Error::Denied => "RBAC: access denied",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = self.body();
        let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        if !body.is_empty() {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        if let Error::FaultAbortGrpc(code) = self {
            // A trailers-only gRPC answer: the status rides in the headers.
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert("grpc-message", HeaderValue::from_static("fault filter abort"));
        }
        response
    }
}
