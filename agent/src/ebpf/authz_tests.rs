//! capture_inbound's AuthorizationPolicy decision, run by the kernel with `BPF_PROG_TEST_RUN`: the real
//! program, verified and run on this kernel (≥ 5.13), with `L4_AUTHZ` written through
//! [`sync_lpm_trie`] and denials read back through [`spawn_denial_reader`]. Each run hands the program a
//! `struct bpf_sk_lookup` as a connection from `client` to `destination` would; the kernel returns the
//! verdict (SK_PASS / SK_DROP) and the cookie of the socket the program selected, if any — here a real
//! listening socket in `INBOUND_LISTENERS`, so "captured" is observable, not assumed.
//!
//! Needs root (BPF); without it the test says SKIPPED, and fails when `CI=true`.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkLookup,
};
use warren_maps::{AUTHZ_ALLOW, AUTHZ_DENY, AuthzEntryKey, AuthzVerdict, Counter, ListenerKey, Settings, names};

use super::{AuthzTrie, EBPF_OBJECT, KernelDenial, program, read_trie, spawn_denial_reader, sync_lpm_trie, take_map};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const SETTINGS: Settings = Settings { outbound_port: 15001, inbound_port: 15006, hbone_port: 15008, socket_acceleration: 0 };

/// `struct bpf_sk_lookup` (include/uapi/linux/bpf.h), as BPF_PROG_TEST_RUN takes and returns it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SkLookupCtx {
    /// In: must be 0. Out: the cookie of the socket the program selected, 0 if none.
    cookie: u64,
    family: u32,
    protocol: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    /// Network byte order.
    remote_port: u16,
    _pad: u16,
    local_ip4: u32,
    local_ip6: [u32; 4],
    /// Host byte order.
    local_port: u32,
    /// Must be 0 for a test run.
    ingress_ifindex: u32,
    _tail: u32,
}

/// The `test` member of `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one run of capture_inbound decided.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// SK_DROP: refused.
    Refused,
    /// SK_PASS with the agent's listener selected.
    Captured,
    /// SK_PASS without selecting a socket (the kernel's own lookup goes on).
    Passed,
}

struct Kernel {
    _ebpf: Ebpf,
    authz: AuthzTrie,
    counters: PerCpuArray<MapData, u64>,
    denials: Option<RingBuf<MapData>>,
    // Held so that their fds, relocated into the program, stay open until it is verified (and after).
    _settings: Array<MapData, Settings>,
    listeners: SockHash<MapData, ListenerKey>,
    /// Listening sockets in INBOUND_LISTENERS, with their cookies.
    sockets: Vec<(TcpListener, u64)>,
    prog_fd: std::os::fd::OwnedFd,
    pin_dir: PathBuf,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Kernel {
    fn load() -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/warren-test-authz-{}", std::process::id()));
        crate::sys::ensure_bpffs(&pin_dir).unwrap();
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(EBPF_OBJECT).expect("loading the eBPF object");
        let mut settings: Array<MapData, Settings> = Array::try_from(take_map(&mut ebpf, names::SETTINGS).unwrap()).unwrap();
        settings.set(0, SETTINGS, 0).unwrap();
        let authz = AuthzTrie::try_from(take_map(&mut ebpf, names::L4_AUTHZ).unwrap()).unwrap();
        let denials = RingBuf::try_from(take_map(&mut ebpf, names::AUTHZ_DENIALS).unwrap()).unwrap();
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS).unwrap()).unwrap();
        let listeners = SockHash::try_from(take_map(&mut ebpf, names::INBOUND_LISTENERS).unwrap()).unwrap();
        let sk_lookup: &mut SkLookup = program(&mut ebpf, "capture_inbound").unwrap().try_into().unwrap();
        sk_lookup.load().expect("verifying capture_inbound");
        let prog_fd = sk_lookup.fd().unwrap().as_fd().try_clone_to_owned().unwrap();
        Kernel {
            _ebpf: ebpf,
            authz,
            counters,
            denials: Some(denials),
            _settings: settings,
            listeners,
            sockets: Vec::new(),
            prog_fd,
            pin_dir,
        }
    }

    /// Puts a listening socket into INBOUND_LISTENERS as the agent's listener for `pod`.
    fn listen_for(&mut self, pod: IpAddr) {
        let listener = TcpListener::bind(SocketAddr::new(if pod.is_ipv4() { "127.0.0.1" } else { "::1" }.parse().unwrap(), 0)).unwrap();
        self.listeners.insert(ListenerKey::new(pod), listener.as_raw_fd(), 0).unwrap();
        let cookie = socket_cookie(&listener);
        self.sockets.push((listener, cookie));
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.counters.get(&(counter as u32), 0).unwrap().iter().sum()
    }

    /// Runs capture_inbound once for a TCP connection from `client` to `destination`.
    fn run(&self, client: SocketAddr, destination: SocketAddr) -> Outcome {
        let mut ctx = SkLookupCtx {
            protocol: libc::IPPROTO_TCP as u32,
            remote_port: client.port().to_be(),
            local_port: u32::from(destination.port()),
            ..Default::default()
        };
        match (client.ip(), destination.ip()) {
            (IpAddr::V4(c), IpAddr::V4(d)) => {
                ctx.family = libc::AF_INET as u32;
                ctx.remote_ip4 = u32::from_ne_bytes(c.octets());
                ctx.local_ip4 = u32::from_ne_bytes(d.octets());
            }
            (IpAddr::V6(_), IpAddr::V6(_)) => {
                ctx.family = libc::AF_INET6 as u32;
                ctx.remote_ip6 = warren_maps::ip_to_words(client.ip()).0;
                ctx.local_ip6 = warren_maps::ip_to_words(destination.ip()).0;
            }
            _ => panic!("mixed families"),
        }
        let mut out = SkLookupCtx::default();
        let mut attr = TestRunAttr {
            prog_fd: self.prog_fd.as_raw_fd() as u32,
            repeat: 1,
            ctx_size_in: size_of::<SkLookupCtx>() as u32,
            ctx_size_out: size_of::<SkLookupCtx>() as u32,
            ctx_in: (&raw const ctx) as u64,
            ctx_out: (&raw mut out) as u64,
            ..Default::default()
        };
        // SAFETY: BPF_PROG_TEST_RUN reads `attr` (size given) and the ctx_in buffer, and writes `attr`
        // and ctx_out; all three are live, correctly sized locals for the duration of the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, 10 /* BPF_PROG_TEST_RUN */, &raw mut attr, size_of::<TestRunAttr>() as u32)
        };
        assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
        match (attr.retval, out.cookie) {
            (SK_DROP, 0) => Outcome::Refused,
            (SK_PASS, 0) => Outcome::Passed,
            (SK_PASS, cookie) if self.sockets.iter().any(|(_, c)| *c == cookie) => Outcome::Captured,
            other => panic!("unexpected result (retval, cookie) = {other:?}"),
        }
    }
}

fn socket_cookie(socket: &impl AsRawFd) -> u64 {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64.
    let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &mut len) };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn entry(dst: &str, port: u16, src: &str, len: u8, verdict: u32, decision_id: u32) -> (AuthzEntryKey, AuthzVerdict) {
    (AuthzEntryKey::new(dst.parse().unwrap(), port, src.parse().unwrap(), len).unwrap(), AuthzVerdict { verdict, decision_id })
}

async fn next_denial(rx: &mut tokio::sync::mpsc::UnboundedReceiver<KernelDenial>) -> KernelDenial {
    tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("a denial record within 2 s").expect("reader alive")
}

async fn no_denial(rx: &mut tokio::sync::mpsc::UnboundedReceiver<KernelDenial>) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        panic!("no denial record expected, got {got:?}");
    }
}

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, but this test needs root (BPF)");
    eprintln!("SKIPPED (needs root for BPF): not running as root");
    false
}

#[tokio::test(flavor = "current_thread")]
async fn sk_lookup_refuses_by_source_prefix_in_the_kernel() {
    if !privileged() {
        return;
    }
    let mut kernel = Kernel::load();
    let pod = addr("10.9.1.2:7000");
    kernel.listen_for(pod.ip());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _reader = spawn_denial_reader(kernel.denials.take().unwrap(), tx).unwrap();
    let inside = addr("10.244.1.77:40000");
    let outside = addr("10.244.2.77:40000");

    // No entry: captured.
    assert_eq!(kernel.run(inside, pod), Outcome::Captured);

    // Deny 10.244.1.0/24 → pod:7000: a client inside the prefix is refused, in the kernel (counter, record
    // with its address and port — 40000 is 0x9c40, so a byte-order slip would show — and the decision id).
    let want = BTreeMap::from([entry("10.9.1.2", 7000, "10.244.1.0", 24, AUTHZ_DENY, 0x0101)]);
    assert_eq!(sync_lpm_trie(&mut kernel.authz, &want).unwrap(), (1, 0));
    let denied = kernel.counter(Counter::InboundDenied);
    let captured = kernel.counter(Counter::InboundCaptured);
    assert_eq!(kernel.run(inside, pod), Outcome::Refused);
    assert_eq!(kernel.counter(Counter::InboundDenied), denied + 1);
    assert_eq!(next_denial(&mut rx).await, KernelDenial { client: inside, destination: pod, decision_id: 0x0101 });
    // Control: a client outside the prefix is captured, and nothing is counted or reported as denied.
    assert_eq!(kernel.run(outside, pod), Outcome::Captured);
    assert_eq!(kernel.counter(Counter::InboundCaptured), captured + 1);
    assert_eq!(kernel.counter(Counter::InboundDenied), denied + 1);
    no_denial(&mut rx).await;
    // Another port of the pod is not covered by a port-7000 entry.
    assert_eq!(kernel.run(inside, addr("10.9.1.2:8080")), Outcome::Captured);
    // Control: the same client, once the entry is removed, is captured.
    assert_eq!(sync_lpm_trie(&mut kernel.authz, &want).unwrap(), (0, 0), "already in sync");
    assert_eq!(sync_lpm_trie(&mut kernel.authz, &BTreeMap::new()).unwrap(), (0, 1));
    assert_eq!(kernel.run(inside, pod), Outcome::Captured);

    // The longest source prefix decides: deny /16, allow the /24 inside it.
    let want = BTreeMap::from([
        entry("10.9.1.2", 7000, "10.244.0.0", 16, AUTHZ_DENY, 2),
        entry("10.9.1.2", 7000, "10.244.1.0", 24, AUTHZ_ALLOW, 3),
    ]);
    assert_eq!(sync_lpm_trie(&mut kernel.authz, &want).unwrap(), (2, 0));
    assert_eq!(read_trie(&kernel.authz).unwrap().0, want, "the trie holds exactly what was written");
    assert_eq!(kernel.run(inside, pod), Outcome::Captured);
    assert_eq!(kernel.run(outside, pod), Outcome::Refused);
    assert_eq!(next_denial(&mut rx).await.decision_id, 2);

    // The exact port's entries first; only when none contains the client, port 0's.
    let want = BTreeMap::from([
        entry("10.9.1.2", 0, "0.0.0.0", 0, AUTHZ_DENY, 4),
        entry("10.9.1.2", 7000, "10.244.1.0", 24, AUTHZ_ALLOW, 5),
    ]);
    // One written (the port-0 entry), one rewritten (allow, new id), the /16 removed.
    assert_eq!(sync_lpm_trie(&mut kernel.authz, &want).unwrap(), (2, 1));
    assert_eq!(kernel.run(inside, pod), Outcome::Captured);
    assert_eq!(kernel.run(outside, pod), Outcome::Refused);
    assert_eq!(next_denial(&mut rx).await, KernelDenial { client: outside, destination: pod, decision_id: 4 });
    assert_eq!(kernel.run(inside, addr("10.9.1.2:8080")), Outcome::Refused);
    assert_eq!(next_denial(&mut rx).await, KernelDenial { client: inside, destination: addr("10.9.1.2:8080"), decision_id: 4 });
    // Another pod's address is not covered; the agent's own ports (HBONE here) are never looked up.
    assert_eq!(kernel.run(inside, addr("10.9.1.3:7000")), Outcome::Passed, "no listener for 10.9.1.3");
    assert_eq!(kernel.run(inside, addr("10.9.1.2:15008")), Outcome::Passed);
    no_denial(&mut rx).await;

    // IPv6: the prefix match runs over all 128 source bits.
    let pod6 = addr("[fd00:10:244:9::2]:7000");
    kernel.listen_for(pod6.ip());
    let want = BTreeMap::from([entry("fd00:10:244:9::2", 7000, "fd00:10:244:1::", 64, AUTHZ_DENY, 6)]);
    assert_eq!(sync_lpm_trie(&mut kernel.authz, &want).unwrap(), (1, 2));
    let inside6 = addr("[fd00:10:244:1::5]:40001");
    assert_eq!(kernel.run(inside6, pod6), Outcome::Refused);
    assert_eq!(next_denial(&mut rx).await, KernelDenial { client: inside6, destination: pod6, decision_id: 6 });
    assert_eq!(kernel.run(addr("[fd00:10:244:2::5]:40001"), pod6), Outcome::Captured);
    // The IPv4 pod is unaffected by the IPv6 entry.
    assert_eq!(kernel.run(outside, pod), Outcome::Captured);
    no_denial(&mut rx).await;
    assert_eq!(kernel.counter(Counter::DenialEventsLost), 0);
}
