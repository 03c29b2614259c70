//! Packet capture on the testbed's fabric (between nodes), to check what travels on the wire.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Result, bail};

/// Every frame seen on the fabric's links while it runs (an AF_PACKET socket in the fabric netns).
pub struct Capture {
    frames: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    pub(crate) fn start(fabric_netns: &str) -> Result<Capture> {
        let socket = crate::in_netns(fabric_netns, || {
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
            if fd < 0 { Err(std::io::Error::last_os_error()) } else { Ok(unsafe { OwnedFd::from_raw_fd(fd) }) }
        })??;
        // A large buffer so that a burst between two nodes is not dropped before we read it.
        let size: libc::c_int = 64 << 20;
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        }
        let (frames, stop) = (Arc::new(Mutex::new(vec![])), Arc::new(AtomicBool::new(false)));
        let thread = std::thread::spawn({
            let (frames, stop) = (frames.clone(), stop.clone());
            move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                    if n > 0 {
                        frames.lock().unwrap().extend_from_slice(&buf[..n as usize]);
                    }
                }
            }
        });
        Ok(Capture { frames, stop, thread: Some(thread) })
    }

    /// Stops capturing; returns the bytes of every frame, concatenated.
    pub fn stop(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The byte stream `warren-testapp send` writes (its deterministic pattern), so a test can look for it.
pub fn testapp_payload(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
