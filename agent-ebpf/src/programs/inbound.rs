//! Inbound capture: attached to each enrolled pod's network namespace, `sk_lookup` hands TCP connections
//! arriving for the pod's addresses to the agent's inbound listener there (no iptables). The agent
//! recovers the original destination with getsockname() on the accepted socket.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use warren_maps::{Counter, ListenerKey, PolicyKey, VERDICT_DENY};

use core::ptr::read_volatile;

use super::{AF_INET, AF_INET6, INBOUND_LISTENERS, L4_POLICY, count, read_ip6, settings};

const IPPROTO_TCP: u32 = 6;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const SK_PASS: u32 = 1;
/// The lookup fails: TCP answers the SYN with a reset (the client sees "connection refused").
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn capture_inbound(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    let (protocol, ingress_ifindex, local_port, family) = unsafe {
        (
            read_volatile(&(*lookup).protocol),
            read_volatile(&(*lookup).ingress_ifindex),
            read_volatile(&(*lookup).local_port),
            read_volatile(&(*lookup).family),
        )
    };
    if protocol != IPPROTO_TCP || ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let port = local_port as u16;
    let settings = settings();
    if port == settings.inbound_port || port == settings.outbound_port || port == settings.hbone_port {
        return SK_PASS;
    }
    let (local, remote) = unsafe {
        match family {
            AF_INET => ([read_volatile(&(*lookup).local_ip4), 0, 0, 0], [read_volatile(&(*lookup).remote_ip4), 0, 0, 0]),
            AF_INET6 => (read_ip6(&(*lookup).local_ip6), read_ip6(&(*lookup).remote_ip6)),
            _ => return SK_PASS,
        }
    };
    // Only traffic from outside the pod is captured. A connection from the pod's address to itself — the
    // agent's own connection to the workload among them — never is. (Such traffic travels over `lo`, but
    // the kernel reports the address's device as ingress_ifindex, so that check alone is not enough.)
    if local == remote {
        return SK_PASS;
    }
    let denied = |port: u16| {
        let key = PolicyKey { ip: local, port, family: family as u16 };
        unsafe { L4_POLICY.get(&key) }.is_some_and(|v| v.verdict == VERDICT_DENY)
    };
    if denied(port) || denied(0) {
        count(Counter::InboundDenied);
        return SK_DROP;
    }
    let key = ListenerKey { ip: local, family: family as u16, _pad: 0 };
    if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        count(Counter::InboundCaptured);
    }
    SK_PASS
}
