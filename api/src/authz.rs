//! AuthorizationPolicy as the agent enforces it: typed match structures, compiled by the controller from
//! users' YAML (`warren-config`'s `compile::policy`), pushed, and evaluated here — by the agent's proxy for
//! each connection, and ahead of time for the kernel's table of plaintext verdicts ([`plaintext_table`]).
//!
//! Istio's semantics (security.istio.io/v1 AuthorizationPolicy, L4 attributes):
//! - a policy applies to the workloads its `selector` picks in its namespace; in the root namespace, to the
//!   whole mesh ([`Policy::applies_to`]);
//! - evaluation: a matching DENY policy denies; else, when any ALLOW policy applies to the workload, the
//!   connection must match one of them; with no ALLOW policy it is allowed. AUDIT only records.
//! - a policy matches when one of its rules does; a rule when one of its sources matches (or it has none),
//!   one of its operations matches (or it has none), and all of its conditions hold;
//! - within a source, operation or condition every field that is set must match (a value list: any of its
//!   values; a `not` list: none of them).
//! - string values match exactly, by prefix (`abc*`), by suffix (`*abc`) or by presence (`*`); a client
//!   without an identity (plaintext) has no principal and no namespace, so it matches no principal or
//!   namespace value — and does match every `notPrincipals` / `notNamespaces` list.
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{tables::Origin, workloads::Pod};

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Records a match; never allows or denies.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// One AuthorizationPolicy, compiled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub origin: Origin,
    /// In the mesh's root namespace: applies to every namespace.
    #[serde(default)]
    pub mesh_wide: bool,
    /// `matchLabels`; `None`: every workload in scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    /// No rules: matches nothing (an ALLOW policy without rules allows nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// One rule. Its `index` is its position in the policy's `spec.rules`, as users wrote it (rules the agent
/// cannot enforce are left out of an ALLOW policy, so positions can skip).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub index: u32,
    /// Any of them; none: every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Any of them; none: every operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// All of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `from[].source`: who the client is. Empty lists are unset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpNet>,
    /// The original client address; without an L7 proxy (no X-Forwarded-For) the connection's source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<IpNet>,
}

/// `to[].operation`: the destination port, and the request's host, method and path (HTTP attributes:
/// only a request has them — see [`Rule::matches`] for a connection without one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    /// Matched case-insensitively (the matchers are lower-cased when compiled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    /// The path without its query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<StringMatch>,
}

impl Operation {
    /// Whether it names request attributes.
    pub fn needs_request(&self) -> bool {
        [&self.hosts, &self.not_hosts, &self.methods, &self.not_methods, &self.paths, &self.not_paths]
            .iter()
            .any(|v| !v.is_empty())
    }
}

/// `when[]`: a condition on one connection attribute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "key")]
pub enum Condition {
    #[serde(rename = "source.ip")]
    SourceIp(Values<IpNet>),
    #[serde(rename = "remote.ip")]
    RemoteIp(Values<IpNet>),
    #[serde(rename = "source.namespace")]
    SourceNamespace(Values<StringMatch>),
    #[serde(rename = "source.principal")]
    SourcePrincipal(Values<StringMatch>),
    #[serde(rename = "destination.ip")]
    DestinationIp(Values<IpNet>),
    #[serde(rename = "destination.port")]
    DestinationPort(Values<u16>),
    #[serde(rename = "connection.sni")]
    ConnectionSni(Values<StringMatch>),
    /// `request.headers[<name>]` (an HTTP attribute).
    #[serde(rename = "request.headers")]
    RequestHeader(HeaderCondition),
}

/// A condition on one request header (`name` lower-case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderCondition {
    pub name: String,
    #[serde(flatten)]
    pub values: Values<StringMatch>,
}

/// A condition's `values` (any of them; empty: unset) and `notValues` (none of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Values<T> {
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<T>,
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<T>,
}

/// Istio's string match for principals, namespaces and SNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    /// `abc*`
    Prefix(String),
    /// `*abc`
    Suffix(String),
    /// `*`: any value that is present and not empty.
    Present,
}

impl StringMatch {
    /// Istio's form: `*`, `prefix*`, `*suffix` or an exact value.
    pub fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Present
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(value.to_string())
        }
    }

    /// An absent attribute matches nothing, not even `*`.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else { return false };
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Present => !value.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(v) => f.write_str(v),
            StringMatch::Prefix(v) => write!(f, "{v}*"),
            StringMatch::Suffix(v) => write!(f, "*{v}"),
            StringMatch::Present => f.write_str("*"),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(StringMatch::parse(&String::deserialize(deserializer)?))
    }
}

/// An IP prefix (`10.0.0.0/8`, `2001:db8::/32`); host bits are cleared, so every prefix has one form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("{0:?} is not an IP address or CIDR block")]
    Address(String),
    #[error("{0:?}: prefix length {1} is longer than the address")]
    Length(String, u32),
}

impl IpNet {
    pub fn new(addr: IpAddr, len: u8) -> Result<IpNet, IpNetError> {
        if u32::from(len) > max_len(&addr) {
            return Err(IpNetError::Length(addr.to_string(), len.into()));
        }
        Ok(IpNet { addr: mask(addr, len), len })
    }

    /// Every address of `addr`'s family.
    pub fn any_of(addr: &IpAddr) -> IpNet {
        let unspecified = if addr.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) };
        IpNet { addr: unspecified, len: 0 }
    }

    pub fn host(addr: IpAddr) -> IpNet {
        IpNet { addr, len: max_len(&addr) as u8 }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4() && mask(*ip, self.len) == self.addr
    }

    /// Whether every address of `other` is in this prefix.
    pub fn contains_net(&self, other: &IpNet) -> bool {
        other.len >= self.len && self.contains(&other.addr)
    }
}

fn max_len(addr: &IpAddr) -> u32 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let masked = if len == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(len))) };
            IpAddr::from(masked.to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let masked = if len == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(len))) };
            IpAddr::from(masked.to_be_bytes())
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// A CIDR block or a single address (a host prefix), as Istio's `ipBlocks` take them.
    fn from_str(value: &str) -> Result<IpNet, IpNetError> {
        let bad = || IpNetError::Address(value.to_string());
        let Some((addr, len)) = value.split_once('/') else {
            return Ok(IpNet::host(value.parse().map_err(|_| bad())?));
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().map_err(|_| bad())?;
        if len > max_len(&addr) {
            return Err(IpNetError::Length(value.to_string(), len));
        }
        IpNet::new(addr, len as u8)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The client's address as evaluation sees it: one address (a connection), or any address of a prefix
/// that no more specific prefix of the policies covers (a region of the kernel's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAddress {
    Ip(IpAddr),
    Region(IpNet),
}

impl SourceAddress {
    fn within(&self, net: &IpNet) -> bool {
        match self {
            SourceAddress::Ip(ip) => net.contains(ip),
            SourceAddress::Region(region) => net.contains_net(region),
        }
    }
}

/// The destination port as evaluation sees it: a port, or any port no policy names (the kernel table's
/// default entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationPort {
    Port(u16),
    Unnamed,
}

impl DestinationPort {
    fn is_in(&self, ports: &[u16]) -> bool {
        matches!(self, DestinationPort::Port(p) if ports.contains(p))
    }
}

/// What is known of one connection when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub source: SourceAddress,
    /// `trust-domain/ns/<namespace>/sa/<account>` (Istio's principal form, no `spiffe://`); `None` for a
    /// client that proved no identity (plaintext).
    pub principal: Option<&'a str>,
    /// The namespace of the client's identity.
    pub namespace: Option<&'a str>,
    pub destination_ip: IpAddr,
    pub destination_port: DestinationPort,
    /// TLS server name the client asked for, when known (not at L4: HBONE's outer handshake is the agent's).
    pub sni: Option<&'a str>,
    /// The HTTP request, when the decision is per request (the inbound L7 stage); `None` at L4.
    pub request: Option<&'a Request<'a>>,
}

/// The HTTP attributes a rule can name.
pub struct Request<'a> {
    pub method: &'a str,
    /// `Host` / `:authority`, lower-cased.
    pub host: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// A request header's value by lower-case name.
    pub header: &'a (dyn Fn(&str) -> Option<&'a str> + Sync),
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{}", self.method, self.host, self.path)
    }
}

impl<'a> Connection<'a> {
    /// A connection from a client with `identity` (a SPIFFE id, `spiffe://td/ns/<ns>/sa/<sa>`), if any.
    pub fn new(source: IpAddr, identity: Option<&'a str>, destination: std::net::SocketAddr) -> Connection<'a> {
        let principal = identity.map(|id| id.strip_prefix("spiffe://").unwrap_or(id));
        let namespace = principal.and_then(|p| p.split('/').skip_while(|s| *s != "ns").nth(1));
        Connection {
            source: SourceAddress::Ip(source),
            principal,
            namespace,
            destination_ip: destination.ip(),
            destination_port: DestinationPort::Port(destination.port()),
            sni: None,
            request: None,
        }
    }

    /// The same connection, deciding one request on it.
    pub fn with_request(self, request: &'a Request<'a>) -> Connection<'a> {
        Connection { request: Some(request), ..self }
    }
}

fn any_string(matchers: &[StringMatch], value: Option<&str>) -> bool {
    matchers.iter().any(|m| m.matches(value))
}

fn any_net(nets: &[IpNet], source: &SourceAddress) -> bool {
    nets.iter().any(|n| source.within(n))
}

/// `values` (when set) match, and `not_values` do not.
fn field<T>(values: &[T], not_values: &[T], matches: impl Fn(&[T]) -> bool) -> bool {
    (values.is_empty() || matches(values)) && (not_values.is_empty() || !matches(not_values))
}

impl Source {
    pub fn matches(&self, c: &Connection) -> bool {
        field(&self.principals, &self.not_principals, |m| any_string(m, c.principal))
            && field(&self.namespaces, &self.not_namespaces, |m| any_string(m, c.namespace))
            && field(&self.ip_blocks, &self.not_ip_blocks, |n| any_net(n, &c.source))
            && field(&self.remote_ip_blocks, &self.not_remote_ip_blocks, |n| any_net(n, &c.source))
    }
}

impl Operation {
    /// Without a request, request attributes are `absent` (see [`Rule::matches`]).
    pub fn matches(&self, c: &Connection, absent: bool) -> bool {
        let ports = field(&self.ports, &self.not_ports, |p| c.destination_port.is_in(p));
        if !self.needs_request() {
            return ports;
        }
        let Some(r) = c.request else { return ports && absent };
        ports
            && field(&self.hosts, &self.not_hosts, |m| any_string(m, Some(r.host)))
            && field(&self.methods, &self.not_methods, |m| any_string(m, Some(r.method)))
            && field(&self.paths, &self.not_paths, |m| any_string(m, Some(r.path)))
    }
}

impl Condition {
    pub fn needs_request(&self) -> bool {
        matches!(self, Condition::RequestHeader(_))
    }

    /// Without a request, a request condition is `absent` (see [`Rule::matches`]).
    pub fn matches(&self, c: &Connection, absent: bool) -> bool {
        let destination = SourceAddress::Ip(c.destination_ip);
        match self {
            Condition::RequestHeader(h) => match c.request {
                Some(r) => field(&h.values.values, &h.values.not_values, |m| any_string(m, (r.header)(&h.name))),
                None => absent,
            },
            Condition::SourceIp(v) | Condition::RemoteIp(v) => {
                field(&v.values, &v.not_values, |n| any_net(n, &c.source))
            }
            Condition::SourceNamespace(v) => field(&v.values, &v.not_values, |m| any_string(m, c.namespace)),
            Condition::SourcePrincipal(v) => field(&v.values, &v.not_values, |m| any_string(m, c.principal)),
            Condition::DestinationIp(v) => field(&v.values, &v.not_values, |n| any_net(n, &destination)),
            Condition::DestinationPort(v) => field(&v.values, &v.not_values, |p| c.destination_port.is_in(p)),
            Condition::ConnectionSni(v) => field(&v.values, &v.not_values, |m| any_string(m, c.sni)),
        }
    }
}

impl Rule {
    /// Whether the rule matches `c`. On a connection decided without a request (a TCP port, the kernel's
    /// table), the request attributes it names count as `absent`: Istio's rule for HTTP-only fields on a
    /// TCP port is that an ALLOW rule with them matches nothing (`false`) and a DENY rule applies without
    /// them (`true`) — either way failing closed.
    pub fn matches(&self, c: &Connection, absent: bool) -> bool {
        // Cheapest first: ports, then conditions, then who the client is (string matches).
        (self.to.is_empty() || self.to.iter().any(|o| o.matches(c, absent)))
            && self.when.iter().all(|w| w.matches(c, absent))
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
    }

    /// Whether it names request attributes (it can only be decided fully per request).
    pub fn needs_request(&self) -> bool {
        self.to.iter().any(Operation::needs_request) || self.when.iter().any(Condition::needs_request)
    }
}

impl Policy {
    /// Whether the policy applies to `pod`: its namespace (or every namespace, from the root namespace),
    /// and its selector's labels.
    pub fn applies_to(&self, pod: &Pod) -> bool {
        let in_scope = self.mesh_wide || self.origin.namespace == pod.namespace;
        in_scope && self.selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
    }

    /// The first rule that matches (request attributes of a connection without one: absent for ALLOW,
    /// present for DENY and AUDIT — see [`Rule::matches`]).
    pub fn matching_rule(&self, c: &Connection) -> Option<&Rule> {
        let absent = self.action != Action::Allow;
        self.rules.iter().find(|r| r.matches(c, absent))
    }

    /// `namespace/name`, how logs, metrics and inspect name the policy.
    pub fn name(&self) -> String {
        format!("{}/{}", self.origin.namespace, self.origin.name)
    }

    /// Every port a rule names, in operations and conditions.
    fn named_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.rules.iter().flat_map(|r| {
            let operations = r.to.iter().flat_map(|o| o.ports.iter().chain(&o.not_ports));
            let conditions = r.when.iter().flat_map(|w| match w {
                Condition::DestinationPort(v) => v.values.iter().chain(&v.not_values).collect::<Vec<_>>(),
                _ => Vec::new(),
            });
            operations.copied().chain(conditions.copied()).collect::<Vec<_>>()
        })
    }

    /// Every source prefix a rule names.
    fn source_prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.rules.iter().flat_map(|r| {
            let sources = r.from.iter().flat_map(|s| {
                s.ip_blocks.iter().chain(&s.not_ip_blocks).chain(&s.remote_ip_blocks).chain(&s.not_remote_ip_blocks)
            });
            let conditions = r.when.iter().flat_map(|w| match w {
                Condition::SourceIp(v) | Condition::RemoteIp(v) => {
                    v.values.iter().chain(&v.not_values).collect::<Vec<_>>()
                }
                _ => Vec::new(),
            });
            sources.copied().chain(conditions.copied()).collect::<Vec<_>>()
        })
    }
}

/// Who decided.
#[derive(Debug, Clone, PartialEq)]
pub enum DecidedBy {
    /// No ALLOW or DENY policy applies to the workload: allowed.
    NoPolicy,
    /// This rule of this policy matched.
    Rule { policy: Arc<Policy>, rule: u32 },
    /// ALLOW policies apply and none matched: denied.
    NoAllowMatched,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub by: DecidedBy,
}

impl Decision {
    /// A stable id of who decided, the same on every agent and across versions (what the kernel table
    /// records): 0 for [`DecidedBy::NoAllowMatched`] and [`DecidedBy::NoPolicy`], else a hash of the
    /// policy's name and the rule's index.
    pub fn id(&self) -> u32 {
        match &self.by {
            DecidedBy::Rule { policy, rule } => decision_id(&policy.name(), *rule),
            _ => 0,
        }
    }

    /// The policy, for metrics and logs (`-` when none decided).
    pub fn policy_name(&self) -> String {
        match &self.by {
            DecidedBy::Rule { policy, .. } => policy.name(),
            _ => "-".into(),
        }
    }

    /// The action that decided: the matching policy's, ALLOW for "no ALLOW policy matched", NONE without
    /// policies.
    pub fn action_name(&self) -> &'static str {
        match &self.by {
            DecidedBy::Rule { policy, .. } => policy.action.as_str(),
            DecidedBy::NoAllowMatched => "ALLOW",
            DecidedBy::NoPolicy => "NONE",
        }
    }
}

/// FNV-1a of `namespace/name#rule`, never 0 (0 is "no ALLOW policy matched").
pub fn decision_id(policy: &str, rule: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in policy.bytes().chain(*b"#").chain(rule.to_string().into_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.max(1)
}

/// The policies that apply to one workload, grouped in evaluation order (each group in the order given).
/// Built once per table version by [`WorkloadPolicies::for_workload`], with an index of its rules by the
/// identities they name; evaluation never parses, and compares strings only with the rules an identity
/// selects.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    pub deny: Vec<Arc<Policy>>,
    pub allow: Vec<Arc<Policy>>,
    pub audit: Vec<Arc<Policy>>,
    /// Every rule of `deny` then `allow` (AUDIT is not indexed: it never decides): (policy, position in
    /// its `rules`).
    rules: Vec<(Arc<Policy>, usize)>,
    /// `rules[..deny_rules]` are DENY rules.
    deny_rules: usize,
    index: RuleIndex,
}

impl WorkloadPolicies {
    pub fn for_workload<'a>(policies: impl IntoIterator<Item = &'a Arc<Policy>>, pod: &Pod) -> WorkloadPolicies {
        let mut out = WorkloadPolicies::default();
        for policy in policies.into_iter().filter(|p| p.applies_to(pod)) {
            match policy.action {
                Action::Deny => out.deny.push(policy.clone()),
                Action::Allow => out.allow.push(policy.clone()),
                Action::Audit => out.audit.push(policy.clone()),
            }
        }
        let rules_of = |policies: &[Arc<Policy>]| -> Vec<(Arc<Policy>, usize)> {
            policies.iter().flat_map(|p| (0..p.rules.len()).map(move |r| (p.clone(), r))).collect()
        };
        out.rules = rules_of(&out.deny);
        out.deny_rules = out.rules.len();
        out.rules.extend(rules_of(&out.allow));
        out.index = RuleIndex::new(out.rules.iter().map(|(p, r)| &p.rules[*r]));
        out
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Whether any rule names request attributes: on an HTTP port, such a workload is authorized per request.
    pub fn need_requests(&self) -> bool {
        self.in_evaluation_order().any(|p| p.rules.iter().any(Rule::needs_request))
    }

    /// DENY, then ALLOW, then AUDIT.
    pub fn in_evaluation_order(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.deny.iter().chain(&self.allow).chain(&self.audit)
    }

    /// Istio's decision for `c`: a matching DENY rule denies; else a matching ALLOW rule allows; else,
    /// with ALLOW policies, it is denied; without, allowed.
    pub fn evaluate(&self, c: &Connection) -> Decision {
        let mut candidates = Vec::with_capacity(32);
        self.index.candidates(c, &mut candidates);
        // Candidates come in evaluation order: every DENY rule before any ALLOW rule.
        for position in candidates {
            let (policy, r) = &self.rules[position as usize];
            let rule = &policy.rules[*r];
            let allowed = position as usize >= self.deny_rules;
            if rule.matches(c, !allowed) {
                return Decision { allowed, by: DecidedBy::Rule { policy: policy.clone(), rule: rule.index } };
            }
        }
        if self.allow.is_empty() {
            Decision { allowed: true, by: DecidedBy::NoPolicy }
        } else {
            Decision { allowed: false, by: DecidedBy::NoAllowMatched }
        }
    }

    /// [`WorkloadPolicies::evaluate`] without the index, rule by rule: what the index must agree with.
    pub fn evaluate_every_rule(&self, c: &Connection) -> Decision {
        let by_rule = |policy: &Arc<Policy>| {
            policy.matching_rule(c).map(|rule| DecidedBy::Rule { policy: policy.clone(), rule: rule.index })
        };
        if let Some(by) = self.deny.iter().find_map(by_rule) {
            return Decision { allowed: false, by };
        }
        if self.allow.is_empty() {
            return Decision { allowed: true, by: DecidedBy::NoPolicy };
        }
        match self.allow.iter().find_map(by_rule) {
            Some(by) => Decision { allowed: true, by },
            None => Decision { allowed: false, by: DecidedBy::NoAllowMatched },
        }
    }

    /// AUDIT policies whose rules match `c` (policy, rule index): recorded, never enforced.
    pub fn audits<'s>(&'s self, c: &'s Connection) -> impl Iterator<Item = (&'s Arc<Policy>, u32)> + 's {
        self.audit.iter().filter_map(move |p| p.matching_rule(c).map(|r| (p, r.index)))
    }
}

/// One entry of the kernel's table of plaintext verdicts: connections from `source` to `destination`:`port`
/// (0: every port no other entry of this destination names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlaintextVerdict {
    pub destination: IpAddr,
    pub port: u16,
    pub source: IpNet,
    pub allowed: bool,
    pub decision_id: u32,
}

/// The decisions for plaintext clients of a workload at `addresses`, as a longest-prefix table over the
/// source address — what sk_lookup consults before a connection reaches the agent.
///
/// A plaintext client has no principal and no namespace, so its decision depends only on its address and
/// the destination's address and port. The prefixes the policies name split the source space into regions
/// (the addresses whose longest matching prefix is the same one); every address of a region is inside and
/// outside the same prefixes, so one evaluation per region — and per named port, plus one for every other
/// port — decides for all of it. Entries a lookup would answer the same without are left out: a port whose
/// verdicts equal the "every other port" ones, a region that decides like the region around it, and a
/// workload whose every verdict is "allow".
pub fn plaintext_table(policies: &WorkloadPolicies, addresses: &[IpAddr]) -> Vec<PlaintextVerdict> {
    if policies.deny.is_empty() && policies.allow.is_empty() {
        return Vec::new();
    }
    let enforced = || policies.deny.iter().chain(&policies.allow);
    let mut ports: Vec<u16> = enforced().flat_map(|p| p.named_ports()).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out = Vec::new();
    for destination in addresses {
        let mut regions: Vec<IpNet> = enforced()
            .flat_map(|p| p.source_prefixes())
            .filter(|n| n.addr().is_ipv4() == destination.is_ipv4())
            .chain([IpNet::any_of(destination)])
            .collect();
        regions.sort_unstable_by_key(|n| (n.prefix_len(), n.addr()));
        regions.dedup();
        let verdicts = |port: DestinationPort| -> Vec<(bool, u32)> {
            regions
                .iter()
                .map(|region| {
                    let c = Connection {
                        source: SourceAddress::Region(*region),
                        principal: None,
                        namespace: None,
                        destination_ip: *destination,
                        destination_port: port,
                        sni: None,
                        request: None,
                    };
                    let decision = policies.evaluate(&c);
                    (decision.allowed, decision.id())
                })
                .collect()
        };
        let unnamed = verdicts(DestinationPort::Unnamed);
        let mut classes = vec![(0u16, unnamed.clone())];
        classes.extend(ports.iter().map(|p| (*p, verdicts(DestinationPort::Port(*p)))).filter(|(_, v)| *v != unnamed));
        for (port, verdicts) in classes {
            if port == 0 && verdicts.iter().all(|(allowed, _)| *allowed) {
                continue;
            }
            for (i, (region, verdict)) in regions.iter().zip(&verdicts).enumerate() {
                // Regions are sorted by prefix length: the enclosing one, if any, comes before.
                let parent = (0..i).rev().find(|j| regions[*j].contains_net(region));
                if parent.is_some_and(|j| verdicts[j] == *verdict) {
                    continue;
                }
                let (allowed, decision_id) = *verdict;
                out.push(PlaintextVerdict { destination: *destination, port, source: *region, allowed, decision_id });
            }
        }
    }
    out
}

mod index;
use index::RuleIndex;

#[cfg(test)]
mod tests;
