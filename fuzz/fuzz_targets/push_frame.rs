//! The push-frame decoder on bytes as the network delivers them: any stream, in any chunking, must decode
//! to messages, `Ok(None)` (wait for more) or an error — never a panic, and never an allocation the bytes
//! received do not pay for (a huge length prefix must not reserve its frame before the frame arrives).
//!
//! Input layout: byte 0 = how many chunk lengths follow (low 3 bits, 0..=7); then that many bytes, each one
//! chunk's length; the rest is the stream, fed in those chunks and then whatever remains in one piece.
#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use libfuzzer_sys::fuzz_target;
use warren_config::push::{Frame, FrameReader, Reply, Update, encode, wire};

/// Records the largest single allocation, so the target can check it against the input's size (without a
/// sanitizer libFuzzer's -malloc_limit_mb has no hook, and an untouched huge reservation costs no RSS).
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// Feeds `stream` to a reader decoding `T` in `chunks`, then the rest; every decoded message must re-encode
/// to a frame that decodes again.
fn decode<T: Frame>(stream: &[u8], chunks: &[usize]) {
    let mut reader = FrameReader::default();
    let mut rest = stream;
    for piece in chunks.iter().copied().chain([usize::MAX]) {
        let (now, later) = rest.split_at(piece.min(rest.len()));
        rest = later;
        reader.push(now);
        loop {
            match reader.next::<T>() {
                Ok(Some(message)) => {
                    let mut again = FrameReader::default();
                    again.push(&encode(&message));
                    assert!(matches!(again.next::<T>(), Ok(Some(_))), "a decoded message does not re-encode");
                }
                Ok(None) => break,
                // A broken stream ends the push session (the agent reconnects).
                Err(_) => return,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    LARGEST.store(0, Relaxed);
    let Some((&header, rest)) = data.split_first() else { return };
    let count = (header & 7) as usize;
    if rest.len() < count {
        return;
    }
    let (lengths, stream) = rest.split_at(count);
    let chunks: Vec<usize> = lengths.iter().map(|&n| n as usize).collect();
    decode::<Update>(stream, &chunks);
    decode::<Reply>(stream, &chunks);
    // Decoded values may be larger than their encoding, but by a bounded factor: an empty message in a
    // repeated field is 2 bytes (its tag and a zero length) and decodes into an element of its vector, which
    // grows by doubling — so at most the largest element's size per input byte. Nothing may scale with a
    // length prefix instead of the bytes received.
    use std::mem::size_of;
    let element = [
        size_of::<wire::Resource>(),
        size_of::<wire::ServicePort>(),
        size_of::<wire::EndpointDetail>(),
        size_of::<wire::IpBlock>(),
        size_of::<wire::FlowEdge>(),
        size_of::<String>(),
        64,
    ];
    let bound = 64 * 1024 + element.into_iter().max().unwrap_or(64) * data.len();
    let largest = LARGEST.load(Relaxed);
    assert!(largest <= bound, "allocated {largest} bytes at once for a {}-byte input", data.len());
});
