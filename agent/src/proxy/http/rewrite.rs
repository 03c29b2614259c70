//! What a rule changes in a request or answers instead of it: header operations, `rewrite`, `redirect`,
//! and the headers a proxy owes the upstream (hop-by-hop headers removed, `x-request-id`,
//! `x-forwarded-proto`).
use http::{HeaderMap, HeaderName, HeaderValue, Uri, header, uri::PathAndQuery};
use warren_api::tables::{HeaderOps, Redirect};

use super::Error;
use crate::state::http_routes::{CompiledRule, Matcher};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
];

/// Removes hop-by-hop headers (and those `Connection` names). An upgrade keeps `Connection: upgrade` and
/// `Upgrade`: the upstream must see the handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|n| !(upgrade && n == "upgrade"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP {
        if upgrade && name == header::CONNECTION {
            continue;
        }
        headers.remove(name);
    }
    // gRPC needs `te: trailers` end to end.
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// `set` replaces, `add` appends, `remove` deletes — in Envoy's order (remove, then set, then add).
pub fn apply(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        if let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            headers.remove(name);
        }
    }
    let parsed = |(k, v): (&String, &String)| {
        Some((HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok()?, HeaderValue::from_str(v).ok()?))
    };
    for (name, value) in ops.set.iter().filter_map(parsed) {
        headers.insert(name, value);
    }
    for (name, value) in ops.add.iter().filter_map(parsed) {
        headers.append(name, value);
    }
}

/// Adds what Envoy adds on the way out: a request id when the client sent none (tracing correlates by
/// it), and the scheme the client used.
pub fn add_proxy_headers(headers: &mut HeaderMap) {
    const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if !headers.contains_key(&REQUEST_ID) {
        let value = HeaderValue::from_str(&request_id()).expect("hex and dashes");
        headers.insert(REQUEST_ID, value);
    }
    // As Envoy in a sidecar (not the edge): a value the downstream set stays; a gateway sets its own.
    headers.entry(HeaderName::from_static("x-forwarded-proto")).or_insert(HeaderValue::from_static("http"));
}

/// A random UUID (version 4), as Envoy generates.
pub(crate) fn request_id() -> String {
    let (a, b) = (super::random(), super::random());
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000; // version 4
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000; // variant 10
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The path after `rewrite`: `uri` replaces the prefix the rule matched (the whole path for an exact or
/// regex match, the leading `/` when the rule has no URI match — Envoy's `prefix_rewrite`);
/// `uriRegexRewrite` (compiled with the rule) substitutes every match in the path. The query is kept.
pub fn rewrite_path(rule: &CompiledRule, matched: Option<&Matcher>, uri: &Uri) -> Result<Option<PathAndQuery>, Error> {
    let path = uri.path();
    let new_path = if let Some((pattern, substitution)) = &rule.uri_regex_rewrite {
        pattern.replace_all(path, substitution.as_str()).into_owned()
    } else if let Some(replacement) = rule.rule.rewrite.as_ref().and_then(|r| r.uri.as_ref()) {
        let matched_len = match matched {
            Some(Matcher::Prefix(prefix)) if path.len() >= prefix.len() => prefix.len(),
            Some(Matcher::Exact(_) | Matcher::Regex(_)) => path.len(),
            _ => 1.min(path.len()),
        };
        format!("{replacement}{}", &path[matched_len..])
    } else {
        return Ok(None);
    };
    let with_query = match uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    with_query.parse().map(Some).map_err(|_| Error::BadRequest(format!("rewritten path {with_query:?} is not valid")))
}

/// Where a `redirect` sends the client: each part the rule gives replaces the request's own.
pub fn location(redirect: &Redirect, authority: &str, uri: &Uri) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let mut host = redirect.authority.clone().unwrap_or_else(|| authority.to_string());
    if let Some(port) = redirect.port {
        let bare = host.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map(|(h, _)| h.to_string());
        host = format!("{}:{port}", bare.unwrap_or(host));
    }
    let path = match &redirect.uri {
        Some(path) => match uri.query() {
            Some(q) if !path.contains('?') => format!("{path}?{q}"),
            _ => path.clone(),
        },
        None => uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into()),
    };
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(uri: Option<&str>, regex: Option<(&str, &str)>) -> CompiledRule {
        let rewrite = warren_api::tables::Rewrite {
            uri: uri.map(Into::into),
            uri_regex: regex.map(|(p, r)| warren_api::tables::RegexRewrite { pattern: p.into(), rewrite: r.into() }),
            authority: None,
        };
        let http = vec![warren_api::tables::HttpRule { rewrite: Some(rewrite), ..Default::default() }];
        let route = warren_api::tables::Route { http, ..Default::default() };
        let compiled = crate::state::http_routes::CompiledRoute::compile(&route);
        std::sync::Arc::into_inner(compiled).unwrap().rules.remove(0)
    }

    #[test]
    fn rewrites_replace_what_matched() {
        let uri: Uri = "/ratings/7?x=1".parse().unwrap();
        let prefix = Matcher::Prefix("/ratings".into());
        let path = |r: &CompiledRule, m| rewrite_path(r, m, &uri).unwrap().unwrap().to_string();
        assert_eq!(path(&rule(Some("/v1/ratings"), None), Some(&prefix)), "/v1/ratings/7?x=1");
        let exact = Matcher::Exact("/ratings/7".into());
        assert_eq!(path(&rule(Some("/all"), None), Some(&exact)), "/all?x=1");
        assert_eq!(path(&rule(Some("/api/"), None), None), "/api/ratings/7?x=1", "no URI match: the leading /");
        assert_eq!(path(&rule(None, Some(("^/ratings/([0-9]+)$", "/r/\\1$"))), None), "/r/7$?x=1");
        assert!(rewrite_path(&rule(None, None), None, &uri).unwrap().is_none());
    }

    #[test]
    fn redirects_keep_what_the_rule_leaves() {
        let uri: Uri = "/old?q=1".parse().unwrap();
        let r = Redirect { uri: Some("/new".into()), port: Some(8443), scheme: Some("https".into()), status: 301, ..Default::default() };
        assert_eq!(location(&r, "shop:9080", &uri), "https://shop:8443/new?q=1");
        let only_host = Redirect { authority: Some("elsewhere".into()), status: 302, ..Default::default() };
        assert_eq!(location(&only_host, "shop", &uri), "http://elsewhere/old?q=1");
    }

    #[test]
    fn hop_by_hop_headers_stop_here() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("end-user", "jason".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, ["end-user", "te"]);
        let mut ops = HeaderOps::default();
        ops.set.insert("End-User".into(), "bob".into());
        ops.add.insert("x-a".into(), "1".into());
        ops.remove.push("te".into());
        apply(&ops, &mut h);
        assert_eq!((h["end-user"].to_str().unwrap(), h["x-a"].to_str().unwrap(), h.contains_key("te")), ("bob", "1", false));
    }
}
