//! Envoy's response flags: what went wrong (or was done on purpose) with a request, one or more of them,
//! printed as Envoy prints them — short codes joined by `,` in Envoy's own order, `-` for none — so
//! access logs and the `response_flags` label read as they do under Istio.
use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

/// A set of flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

/// One flag: its bit is its place in Envoy's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// UH: no healthy endpoint (none, or all ejected).
    NoHealthyUpstream,
    /// UT: the route's (or a try's) timeout passed.
    UpstreamTimeout,
    /// LR: the proxy reset the request itself.
    LocalReset,
    /// UR: the upstream reset the stream.
    UpstreamRemoteReset,
    /// UF: the connection to the endpoint could not be made.
    UpstreamConnectFailure,
    /// UC: the upstream connection ended before the response did.
    UpstreamConnectionTermination,
    /// UO: a connection pool limit (or the retry budget) was full.
    UpstreamOverflow,
    /// URX: the tries ran out (retries exhausted) and the last failure is the answer.
    RetryLimitExceeded,
    /// NR: no route.
    NoRoute,
    /// DI: a fault delay was injected.
    DelayInjected,
    /// FI: a fault abort was injected.
    FaultInjected,
    /// DC: the client went away before the response ended.
    DownstreamConnectionTermination,
    /// DPE: the request could not be proxied as it is.
    DownstreamProtocolError,
    /// Warren's: an AuthorizationPolicy denied the request.
    Rbac,
}

impl Flag {
    const ALL: [Flag; 14] = [
        Flag::NoHealthyUpstream,
        Flag::UpstreamTimeout,
        Flag::LocalReset,
        Flag::UpstreamRemoteReset,
        Flag::UpstreamConnectFailure,
        Flag::UpstreamConnectionTermination,
        Flag::UpstreamOverflow,
        Flag::RetryLimitExceeded,
        Flag::NoRoute,
        Flag::DelayInjected,
        Flag::FaultInjected,
        Flag::DownstreamConnectionTermination,
        Flag::DownstreamProtocolError,
        Flag::Rbac,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamTimeout => "UT",
            Flag::LocalReset => "LR",
            Flag::UpstreamRemoteReset => "UR",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::UpstreamOverflow => "UO",
            Flag::RetryLimitExceeded => "URX",
            Flag::NoRoute => "NR",
            Flag::DelayInjected => "DI",
            Flag::FaultInjected => "FI",
            Flag::DownstreamConnectionTermination => "DC",
            Flag::DownstreamProtocolError => "DPE",
            Flag::Rbac => "RBAC",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl From<Flag> for ResponseFlags {
    fn from(flag: Flag) -> Self {
        ResponseFlags(flag.bit())
    }
}

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);

    pub fn with(self, flag: Flag) -> ResponseFlags {
        ResponseFlags(self.0 | flag.bit())
    }

    pub fn add(&mut self, flag: Flag) {
        self.0 |= flag.bit();
    }

    pub fn union(self, other: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | other.0)
    }

    pub fn contains(self, flag: Flag) -> bool {
        self.0 & flag.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// As Envoy prints them: `UF,URX`; `-` for none. A label value, so `&'static`: single flags are
    /// constants, the few combinations that occur are interned once.
    pub fn as_str(self) -> &'static str {
        if self.0 == 0 {
            return "-";
        }
        if self.0.is_power_of_two() {
            return Flag::ALL[self.0.trailing_zeros() as usize].code();
        }
        static COMBINATIONS: OnceLock<Mutex<HashMap<u32, &'static str>>> = OnceLock::new();
        let mut interned = COMBINATIONS.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
        interned.entry(self.0).or_insert_with(|| {
            let codes: Vec<_> = Flag::ALL.iter().filter(|f| self.contains(**f)).map(|f| f.code()).collect();
            // At most 2^14 distinct strings, in practice a handful: leaking them is bounded.
            Box::leak(codes.join(",").into_boxed_str())
        })
    }
}

impl std::fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_in_envoys_order() {
        assert_eq!(ResponseFlags::NONE.as_str(), "-");
        assert_eq!(ResponseFlags::from(Flag::UpstreamOverflow).as_str(), "UO");
        let exhausted = ResponseFlags::from(Flag::RetryLimitExceeded).with(Flag::UpstreamConnectFailure);
        assert_eq!(exhausted.as_str(), "UF,URX");
        assert!(std::ptr::eq(exhausted.as_str(), exhausted.as_str()), "interned once");
        assert_eq!(ResponseFlags::from(Flag::FaultInjected).with(Flag::DelayInjected).to_string(), "DI,FI");
    }
}
