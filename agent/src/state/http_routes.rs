//! VirtualService `http` rules compiled for the L7 proxy, once per table version: every string match
//! becomes a [`Matcher`] (regexes compiled here, anchored as Envoy's `safe_regex` is: the whole value
//! must match), every header name parsed. A request is routed by [`CompiledRoute::route`]: the first rule
//! one of whose match blocks matches (blocks are OR'ed, conditions within a block AND'ed), as Istio does.
use std::{collections::BTreeMap, sync::Arc};

use http::{HeaderMap, HeaderName, Method, Uri};
use regex::Regex;
use warren_api::{
    http::{HttpMatchRequest, StringMatch},
    tables::{HttpRule, Origin, Route, qualify_gateway},
};

/// One string condition of a match.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    /// `{}`: the value is present, whatever it is.
    Present,
}

impl Matcher {
    fn compile(field: &str, m: &StringMatch, ignore_case: bool) -> Result<Matcher, String> {
        let fold = |s: &String| if ignore_case { s.to_ascii_lowercase() } else { s.clone() };
        if let Some(exact) = &m.exact {
            return Ok(Matcher::Exact(fold(exact)));
        }
        if let Some(prefix) = &m.prefix {
            return Ok(Matcher::Prefix(fold(prefix)));
        }
        if let Some(pattern) = &m.regex {
            let anchored = format!("^(?:{pattern})$");
            return regex::RegexBuilder::new(&anchored)
                .case_insensitive(ignore_case)
                .build()
                .map(Matcher::Regex)
                .map_err(|e| format!("{field}.regex: {pattern:?} is not a valid regex: {e}"));
        }
        Ok(Matcher::Present)
    }

    /// Whether `value` (already case-folded when the match ignores case) matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(e) => value == e,
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
            Matcher::Present => true,
        }
    }
}

/// What a match block can look at, beyond the request itself: where the request goes and who sends it.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// Where the request came in: `mesh` (a workload's own request), or the gateway's `namespace/name`.
    pub gateway: &'a str,
    /// The service port the client addressed.
    pub port: u16,
    /// The source workload's labels and namespace, when it is a pod the tables know.
    pub source_labels: Option<&'a BTreeMap<String, String>>,
    pub source_namespace: Option<&'a str>,
}

/// One match block, compiled.
#[derive(Debug, Clone, Default)]
pub struct CompiledMatch {
    uri: Option<Matcher>,
    ignore_uri_case: bool,
    scheme: Option<Matcher>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
    headers: Vec<(HeaderName, Matcher)>,
    without_headers: Vec<(HeaderName, Matcher)>,
    query_params: Vec<(String, Matcher)>,
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
    /// `gateways` of the block, qualified (`namespace/name`, `mesh`): when set, the block applies only to
    /// requests through one of them.
    gateways: Vec<String>,
    /// A block that did not compile: matches nothing.
    never: bool,
}

impl CompiledMatch {
    fn compile(field: &str, m: &HttpMatchRequest, namespace: &str) -> Result<Self, String> {
        let ignore_uri_case = m.ignore_uri_case.unwrap_or(false);
        let one = |name: &str, sm: &Option<StringMatch>, fold: bool| {
            sm.as_ref().map(|sm| Matcher::compile(&format!("{field}.{name}"), sm, fold)).transpose()
        };
        let headers = |name: &str, map: &BTreeMap<String, StringMatch>| -> Result<Vec<(HeaderName, Matcher)>, String> {
            map.iter()
                .map(|(key, sm)| {
                    let header = HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("{field}.{name}.{key}: not a valid header name"))?;
                    Ok((header, Matcher::compile(&format!("{field}.{name}.{key}"), sm, false)?))
                })
                .collect()
        };
        Ok(CompiledMatch {
            uri: one("uri", &m.uri, ignore_uri_case)?,
            ignore_uri_case,
            scheme: one("scheme", &m.scheme, false)?,
            method: one("method", &m.method, false)?,
            authority: one("authority", &m.authority, false)?,
            headers: headers("headers", &m.headers)?,
            without_headers: headers("withoutHeaders", &m.without_headers)?,
            query_params: m
                .query_params
                .iter()
                .map(|(k, sm)| Ok((k.clone(), Matcher::compile(&format!("{field}.queryParams.{k}"), sm, false)?)))
                .collect::<Result<_, String>>()?,
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
            gateways: m.gateways.iter().map(|g| qualify_gateway(g, namespace)).collect(),
            never: false,
        })
    }

    /// Envoy's rules: `exact` and `regex` see the path without its query; `prefix` sees the whole `:path`.
    /// The URI condition, which `rewrite.uri` consults.
    pub fn uri(&self) -> Option<&Matcher> {
        self.uri.as_ref()
    }

    fn uri_matches(&self, uri: &Uri) -> bool {
        let Some(matcher) = &self.uri else { return true };
        let whole = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let value = match matcher {
            Matcher::Prefix(_) => whole,
            _ => uri.path(),
        };
        if self.ignore_uri_case { matcher.matches(&value.to_ascii_lowercase()) } else { matcher.matches(value) }
    }

    pub fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap, context: &RequestContext) -> bool {
        let header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let authority = authority(headers, uri);
        !self.never
            && (self.gateways.is_empty() || self.gateways.iter().any(|g| g == context.gateway))
            && self.port.is_none_or(|p| p == context.port)
            && self.uri_matches(uri)
            && self.scheme.as_ref().is_none_or(|m| m.matches(uri.scheme_str().unwrap_or("http")))
            && self.method.as_ref().is_none_or(|m| m.matches(method.as_str()))
            && self.authority.as_ref().is_none_or(|m| m.matches(authority))
            && self.headers.iter().all(|(name, m)| header(name).is_some_and(|v| m.matches(v)))
            && self.without_headers.iter().all(|(name, m)| !header(name).is_some_and(|v| m.matches(v)))
            && self.query_params.iter().all(|(key, m)| query_param(uri, key).is_some_and(|v| m.matches(&v)))
            && self.source_namespace.as_deref().is_none_or(|ns| context.source_namespace == Some(ns))
            && self.source_labels.iter().all(|(k, v)| context.source_labels.and_then(|l| l.get(k)) == Some(v))
    }
}

/// A request's authority: `Host` (HTTP/1.1), else the URI's (HTTP/2 `:authority`); empty when neither.
pub fn authority<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> &'a str {
    headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

fn query_param(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| v.to_string())
    })
}

/// One `http` rule of a VirtualService, with its match blocks compiled.
#[derive(Debug)]
pub struct CompiledRule {
    /// `http[i]` in the VirtualService.
    pub index: usize,
    pub matches: Vec<CompiledMatch>,
    pub rule: HttpRule,
    /// `rewrite.uriRegexRewrite`: the pattern, and the substitution in the regex crate's syntax.
    pub uri_regex_rewrite: Option<(Regex, String)>,
}

/// Envoy's `\1` group references in the regex crate's syntax (`${1}`; a literal `$` doubled).
fn regex_substitution(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// The `http` rules of the VirtualService that routes a service.
#[derive(Debug)]
pub struct CompiledRoute {
    pub origin: Origin,
    pub rules: Vec<CompiledRule>,
    /// Match blocks that did not compile (the controller validates regexes, so only a skewed controller
    /// sends one): the block matches nothing, and says so here.
    pub errors: Vec<String>,
}

impl CompiledRoute {
    pub fn compile(route: &Route) -> Arc<CompiledRoute> {
        let mut errors = Vec::new();
        let rules = route
            .http
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let matches = rule
                    .matches
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| {
                        CompiledMatch::compile(&format!("spec.http[{index}].match[{i}]"), m, &route.origin.namespace)
                            .map_err(|e| errors.push(e))
                            .ok()
                    })
                    .collect::<Vec<_>>();
                // Every block failed: the rule must match nothing rather than everything.
                let unmatchable = !rule.matches.is_empty() && matches.is_empty();
                let matches = if unmatchable { vec![CompiledMatch { never: true, ..Default::default() }] } else { matches };
                let uri_regex_rewrite = rule.rewrite.as_ref().and_then(|r| r.uri_regex.as_ref()).and_then(|r| {
                    Regex::new(&r.pattern)
                        .map(|pattern| (pattern, regex_substitution(&r.rewrite)))
                        .map_err(|e| errors.push(format!("spec.http[{index}].rewrite.uriRegexRewrite.match: {e}")))
                        .ok()
                });
                CompiledRule { index, matches, rule: rule.clone(), uri_regex_rewrite }
            })
            .collect();
        Arc::new(CompiledRoute { origin: route.origin.clone(), rules, errors })
    }

    /// The first rule that takes the request, and the match block that did (none for a catch-all rule);
    /// `None` when no rule does (Istio answers 404).
    pub fn route(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        context: &RequestContext,
    ) -> Option<(&CompiledRule, Option<&CompiledMatch>)> {
        self.rules.iter().find_map(|r| {
            if r.matches.is_empty() {
                return Some((r, None));
            }
            r.matches.iter().find(|m| m.matches(method, uri, headers, context)).map(|m| (r, Some(m)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> Arc<CompiledRoute> {
        let http: Vec<HttpRule> = serde_yaml::from_str(yaml).unwrap();
        CompiledRoute::compile(&Route { http, ..Default::default() })
    }

    fn pick(route: &CompiledRoute, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<usize> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let labels = BTreeMap::from([("app".to_string(), "sleep".to_string())]);
        let context = RequestContext { gateway: warren_api::tables::MESH_GATEWAY, port: 9080, source_labels: Some(&labels), source_namespace: Some("default") };
        route.route(&method.parse().unwrap(), &uri.parse().unwrap(), &map, &context).map(|(r, _)| r.index)
    }

    #[test]
    fn first_matching_rule_wins_blocks_or_conditions_and() {
        let r = route(
            "- matches: [{headers: {end-user: {exact: jason}}, uri: {prefix: /api}}, {queryParams: {v: {exact: '2'}}}]\n  destinations: []\n\
             - matches: [{uri: {regex: '/static/.*[.]css'}, method: {exact: GET}}]\n  destinations: []\n\
             - destinations: []\n",
        );
        assert_eq!(pick(&r, "GET", "/api/x", &[("end-user", "jason")]), Some(0), "both conditions of block 0");
        assert_eq!(pick(&r, "GET", "/api/x", &[("end-user", "bob")]), Some(2), "control: header differs → catch-all");
        assert_eq!(pick(&r, "GET", "/other?v=2", &[]), Some(0), "block 1 of rule 0");
        assert_eq!(pick(&r, "GET", "/static/a.css", &[]), Some(1));
        assert_eq!(pick(&r, "GET", "/static/a.css?x=1", &[]), Some(1), "regex sees the path without the query");
        assert_eq!(pick(&r, "POST", "/static/a.css", &[]), Some(2), "method condition");
        assert_eq!(pick(&r, "GET", "/x/static/a.css", &[]), Some(2), "regex is anchored");
    }

    #[test]
    fn without_a_catch_all_nothing_routes_unmatched_requests() {
        let r = route("- matches: [{uri: {exact: /a}, ignoreUriCase: true}]\n  destinations: []\n");
        assert_eq!(pick(&r, "GET", "/A", &[]), Some(0), "ignoreUriCase");
        assert_eq!(pick(&r, "GET", "/b", &[]), None);
    }

    #[test]
    fn source_port_and_absent_headers() {
        let r = route(
            "- matches: [{sourceLabels: {app: sleep}, port: 9080, withoutHeaders: {x-canary: {}}}]\n  destinations: []\n\
             - matches: [{sourceNamespace: other}]\n  destinations: []\n",
        );
        assert_eq!(pick(&r, "GET", "/", &[]), Some(0));
        assert_eq!(pick(&r, "GET", "/", &[("x-canary", "1")]), None, "withoutHeaders: present → no match");
    }

    #[test]
    fn an_invalid_regex_matches_nothing_and_is_named() {
        let r = route("- matches: [{uri: {regex: '('}}]\n  destinations: []\n- destinations: []\n");
        assert_eq!(pick(&r, "GET", "/", &[]), Some(1), "the broken rule takes nothing");
        assert!(r.errors[0].starts_with("spec.http[0].match[0].uri.regex: \"(\" is not a valid regex"), "{:?}", r.errors);
    }
}
