//! Inbound capture: attached to each enrolled pod's network namespace, `sk_lookup` hands TCP connections
//! arriving for the pod's addresses to the agent's inbound listener there (no iptables). The agent
//! recovers the original destination with getsockname() on the accepted socket.
//!
//! Before capture, AuthorizationPolicy: the `L4_AUTHZ` entry for (pod address, port, client address)
//! may refuse the connection right here, in the kernel (see [`authz_verdict`]).
use aya_ebpf::{
    bindings::bpf_sk_lookup,
    macros::sk_lookup,
    maps::lpm_trie::Key,
    programs::SkLookupContext,
};
use warren_maps::{AUTHZ_DENY, AUTHZ_FIXED_PREFIX_BITS, AuthzDenial, AuthzTarget, AuthzVerdict, Counter, ListenerKey};

use core::ptr::read_volatile;

use super::{AF_INET, AF_INET6, AUTHZ_DENIALS, INBOUND_LISTENERS, L4_AUTHZ, count, read_ip6, settings};

const IPPROTO_TCP: u32 = 6;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const SK_PASS: u32 = 1;
/// The lookup fails: TCP answers the SYN with a reset (the client sees "connection refused").
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn capture_inbound(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: `ctx.lookup` is the kernel's `struct bpf_sk_lookup` for this run, valid and readable
    // throughout it; each field is read with one load at its fixed offset, as the verifier requires.
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
    // SAFETY: as above; read_ip6 gets pointers to the context's own 4-word address fields.
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
    let family = family as u16;
    if let Some(verdict) = authz_verdict(family, port, local, remote)
        && verdict.verdict == AUTHZ_DENY
    {
        count(Counter::InboundDenied);
        report_denial(lookup, family, port, local, remote, verdict.decision_id);
        return SK_DROP;
    }
    let key = ListenerKey { ip: local, family, _pad: 0 };
    if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        count(Counter::InboundCaptured);
    }
    SK_PASS
}

/// The `L4_AUTHZ` entry that decides a connection to `dst`:`port` from `src`: among the entries for this
/// exact port, the one with the longest source prefix containing `src`; if there is none, the same among
/// the entries for port 0 ("every port no entry names"). No entry: no AuthorizationPolicy decides here.
///
/// Every entry's prefix covers family, port and destination (160 bits), so the trie's longest-prefix
/// match only ever runs over the source; the lookup key carries the whole source address.
#[inline(always)]
fn authz_verdict(family: u16, port: u16, dst: [u32; 4], src: [u32; 4]) -> Option<AuthzVerdict> {
    let src_bits = if family == AF_INET as u16 { 32 } else { 128 };
    let key = |port| Key::new(AUTHZ_FIXED_PREFIX_BITS + src_bits, AuthzTarget { family, port, dst_ip: dst, src_ip: src });
    L4_AUTHZ.get(key(port)).or_else(|| L4_AUTHZ.get(key(0))).copied()
}

/// Tells the agent about a refused connection (`AUTHZ_DENIALS`); when the ring is full the record is
/// dropped and counted — the connection is refused either way.
#[inline(always)]
fn report_denial(lookup: *const bpf_sk_lookup, family: u16, port: u16, dst: [u32; 4], src: [u32; 4], decision_id: u32) {
    // SAFETY: `lookup` is the program's context (see capture_inbound). remote_port is a __be16 field
    // (with 16 bits of padding after it); a 2-byte load at its offset is what the verifier allows.
    let src_port = u16::from_be(unsafe { read_volatile(&(*lookup).remote_port) });
    let denial = AuthzDenial {
        family,
        dst_port: port,
        src_port,
        _pad: 0,
        src_ip: src,
        dst_ip: dst,
        decision_id,
        _pad2: 0,
    };
    if AUTHZ_DENIALS.output::<AuthzDenial>(&denial, 0).is_err() {
        count(Counter::DenialEventsLost);
    }
}
