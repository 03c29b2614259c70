//! Protocol detection for service ports that name no protocol (Istio's sniffing): the client's first
//! bytes are peeked (not consumed) for an HTTP/1.x request line or the HTTP/2 preface. A client that says
//! nothing within [`DETECTION_WAIT`] speaks a server-first protocol (MySQL, SMTP…) and goes as TCP.
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a client may stay silent before the connection is taken as TCP.
pub const DETECTION_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http,
    Tcp,
}

const METHODS: [&[u8]; 9] = [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT "];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What the first bytes are.
pub fn classify(first: &[u8]) -> Option<Detected> {
    let may_become = |token: &[u8]| token.starts_with(first) || first.starts_with(token);
    if first.starts_with(H2_PREFACE) || METHODS.iter().any(|m| first.starts_with(m)) {
        return Some(Detected::Http);
    }
    if H2_PREFACE.starts_with(first) || METHODS.iter().any(|m| may_become(m)) {
        return None; // too few bytes to tell
    }
    Some(Detected::Tcp)
}

/// Peeks until the bytes decide, the client goes silent, or it closes.
pub async fn detect(stream: &TcpStream) -> Detected {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + DETECTION_WAIT;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        match peeked {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Detected::Tcp,
            Ok(Ok(n)) => match classify(&buf[..n]) {
                Some(detected) => return detected,
                // Peek returns what is queued at once; wait for more.
                None => {
                    if tokio::time::Instant::now() >= deadline {
                        return Detected::Tcp;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Detected::Http));
        assert_eq!(classify(b"PO"), None, "could still be POST");
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp), "TLS");
        assert_eq!(classify(b"GETX"), Some(Detected::Tcp));
        assert_eq!(classify(b"hello"), Some(Detected::Tcp));
    }
}
