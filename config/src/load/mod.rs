//! Reading Kubernetes and Istio objects from YAML files, as `kubectl apply -f DIR` would take them: every
//! `*.yaml`/`*.yml` file of a directory (sorted by name; documents in order; later definitions of the same
//! object replace earlier ones). Nothing in a file stops the rest from applying: what cannot be read is
//! reported as a notice ([`crate::analyze::Message`], in [`ClusterState::notices`]) and left out.
//!
//! | code | level | what |
//! |---|---|---|
//! | `WAR0001` [`SKIPPED_KIND`] | Info | objects of a kind Warren does not read (ServiceAccount, ConfigMap, Telemetry, …): one notice per kind, with the count |
//! | `WAR0002` [`POD_TEMPLATES`] | Info | Deployments, ReplicaSets, StatefulSets, DaemonSets: read only for their pod templates; a stand-in pod each where the directory has no Pods of theirs |
//! | `WAR0003` [`REDEFINED`] | Info | an object defined again (same kind, namespace, name): the later definition replaces the earlier, both locations named |
//! | `WAR0004` [`UNREADABLE`] | Error | a file or document that could not be read: I/O, not UTF-8, not YAML, not a Kubernetes object, no `kind` or `metadata.name` |
//! | `WAR0005` [`LIMIT_EXCEEDED`] | Error | a file, object or nesting past the limits below |
//! | `WAR0006` [`UNSERVED_VERSION`] | Error | an `apiVersion` the API server would not serve (e.g. `networking.istio.io/v9`) |
//! | `WAR0007` [`KEPT_PREVIOUS`] | Warning | (`run` mode) an object that could not be read this time: the version read before stays in force |
//! | `IST0106` | Error | an object of a kind Warren reads whose fields do not parse (wrong type): the field path and serde's message |
//!
//! Limits, so hostile input costs time and memory in proportion to its size: [`MAX_FILE_BYTES`] per file,
//! [`MAX_OBJECT_BYTES`] per object (etcd's default request limit: the API server would not store a larger
//! one either), [`MAX_DEPTH`] levels of nesting (checked before serde_yaml loads a document — see
//! `document::check_depth` for why), and a budget of values per document against alias bombs. (Items of a
//! `kind: List` are bounded by the file's limit, not one by one.)
//!
//! Notices about a file rather than an object (not YAML, too large, …) have an empty `object` and the file
//! (`name:line` where known) as `source`; per-kind notices (WAR0001, WAR0002) name only the kind.
mod assemble;
mod cluster_ip;
mod directory;
mod document;
mod object;
mod value;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use directory::Directory;

use crate::{
    analyze::{Level, Message},
    cluster::ClusterState,
    tables::Origin,
    workloads::Pod,
};

pub const SKIPPED_KIND: &str = "WAR0001";
pub const POD_TEMPLATES: &str = "WAR0002";
pub const REDEFINED: &str = "WAR0003";
pub const UNREADABLE: &str = "WAR0004";
pub const LIMIT_EXCEEDED: &str = "WAR0005";
pub const UNSERVED_VERSION: &str = "WAR0006";
pub const KEPT_PREVIOUS: &str = "WAR0007";

pub const MAX_FILE_BYTES: u64 = 8 << 20;
pub const MAX_OBJECT_BYTES: usize = 1536 << 10;
pub const MAX_DEPTH: usize = 64;

/// The name `add_yaml` gives its text in sources and notices.
pub const INPUT_NAME: &str = "<input>";

/// An object's identity, as `kubectl apply` matches it (the group, not the version: `v1alpha3` and `v1`
/// of a VirtualService are the same object).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    fn origin(&self) -> Origin {
        Origin::new(&self.kind, &self.namespace, &self.name, None)
    }
}

/// One object read from a file.
#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub key: Key,
    pub line: usize,
    pub body: Body,
}

/// What an object is to Warren.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per object read; boxing buys nothing here
pub(crate) enum Body {
    Namespace(crate::workloads::Namespace),
    Pod(Pod),
    Service(k8s_openapi::api::core::v1::Service),
    Endpoints(k8s_openapi::api::core::v1::Endpoints),
    /// A Node: its topology labels give localities.
    Node(k8s_openapi::api::core::v1::Node),
    VirtualService(crate::istio::VirtualService),
    DestinationRule(crate::istio::DestinationRule),
    Gateway(crate::istio::Gateway),
    ServiceEntry(crate::istio::ServiceEntry),
    AuthorizationPolicy(crate::istio::AuthorizationPolicy),
    PeerAuthentication(crate::workloads::peer_authentication::PeerAuthentication),
    Secret(k8s_openapi::api::core::v1::Secret),
    /// The `istio` ConfigMap (Istio's mesh config); other ConfigMaps are skipped.
    MeshConfigMap(k8s_openapi::api::core::v1::ConfigMap),
    /// A workload controller (Deployment, …): only its pod template matters.
    Workload(Template),
    /// A kind Warren does not read.
    Skipped,
}

/// The parts of a workload's pod template a stand-in pod is made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Template {
    pub replicas: Option<i64>,
    /// `spec.selector.matchLabels`, or the template's labels where there is none.
    pub selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub host_network: bool,
}

/// What one file (or one YAML text) held: its objects in order, and what reading it found.
#[derive(Debug, Clone, Default)]
pub struct FileRead {
    pub(crate) name: String,
    pub(crate) objects: Vec<Object>,
    pub(crate) notices: Vec<Message>,
    /// Objects that could not be read: by key where it was readable, `None` where not (a document that is
    /// not YAML, a file that could not be read at all).
    pub(crate) failed: Vec<Option<Key>>,
}

impl FileRead {
    fn new(name: &str) -> Self {
        FileRead { name: name.into(), ..Default::default() }
    }

    pub(crate) fn location(&self, line: usize) -> String {
        format!("{}:{line}", self.name)
    }

    /// Records that something could not be read (`key`, if known) and why.
    fn fail(&mut self, key: Option<Key>, notice: Message) {
        self.failed.push(key);
        self.notices.push(notice);
    }

    /// An Error notice about the file itself (or a document in it whose object is unknown).
    fn file_error(&mut self, code: &'static str, line: Option<usize>, text: String) {
        let source = Some(line.map_or_else(|| self.name.clone(), |l| self.location(l)));
        self.fail(None, Message { level: Level::Error, code, object: Origin::default(), field: None, text, source });
    }

    /// An Error notice about one object.
    fn object_error(&mut self, code: &'static str, key: Key, line: usize, field: Option<String>, text: String) {
        let source = Some(self.location(line));
        self.fail(Some(key.clone()), Message { level: Level::Error, code, object: key.origin(), field, text, source });
    }
}

/// Reads every document of `text`, named `name` in sources and notices.
pub(crate) fn read_text(name: &str, text: &str) -> FileRead {
    let mut read = FileRead::new(name);
    for document in document::split(text.strip_prefix('\u{feff}').unwrap_or(text)) {
        read_document(&mut read, &document);
    }
    read
}

fn read_document(read: &mut FileRead, document: &document::Document) {
    if let Err(line) = document::check_depth(document.text) {
        let text = format!("collections nested deeper than {MAX_DEPTH} levels; the document is skipped");
        return read.file_error(LIMIT_EXCEEDED, Some(document.first_line + line - 1), text);
    }
    let mut budget = value::Budget::for_text(document.text.len());
    // After a syntax error serde_yaml yields the same error for every further document: stop at the first.
    for yaml in serde_yaml::Deserializer::from_str(document.text) {
        match budget.read(yaml) {
            Ok(serde_json::Value::Null) => {}
            Ok(value) => object::read(read, value, document.line, document.text.len()),
            Err(e) => return yaml_error(read, document, &e, budget.exceeded.take()),
        }
    }
}

/// A document serde_yaml could not read, or that went past a limit (`limit`: which) while it was read.
fn yaml_error(read: &mut FileRead, document: &document::Document, error: &serde_yaml::Error, limit: Option<String>) {
    let offset = document.first_line - 1;
    let line = error.location().map_or(document.line, |l| l.line() + offset);
    match limit {
        // serde_yaml's message would start with the path down to the limit: dozens of `[0]`.
        Some(limit) => read.file_error(LIMIT_EXCEEDED, Some(line), format!("{limit}; the document is skipped")),
        None => {
            let message = shift_lines(&error.to_string(), offset);
            read.file_error(UNREADABLE, Some(line), format!("not valid YAML: {message}; the document is skipped"));
        }
    }
}

/// serde_yaml counts lines from the start of the document it was given; the file's numbers are `offset`
/// further on.
fn shift_lines(message: &str, offset: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Reads one file: bounded in size, any panic in parsing turned into an Error notice for the file.
pub(crate) fn read_file(path: &std::path::Path, name: &str) -> FileRead {
    let text = match read_bounded(path) {
        Ok(text) => text,
        Err((code, why)) => {
            let mut read = FileRead::new(name);
            read.file_error(code, None, why);
            return read;
        }
    };
    guarded(name, || read_text(name, &text))
}

/// Parsing should not panic on any input; if it does, the file is reported and the rest still loads.
fn guarded(name: &str, read: impl FnOnce() -> FileRead + std::panic::UnwindSafe) -> FileRead {
    std::panic::catch_unwind(read).unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
        let mut read = FileRead::new(name);
        read.file_error(UNREADABLE, None, format!("reading it panicked ({}): a bug in Warren; its objects are skipped", what.unwrap_or("?")));
        read
    })
}

fn read_bounded(path: &std::path::Path) -> Result<String, (&'static str, String)> {
    use std::io::Read;
    let too_large = |size: u64| (LIMIT_EXCEEDED, format!("{size} bytes; files are read up to {MAX_FILE_BYTES} bytes (8 MiB); its objects are skipped"));
    let file = std::fs::File::open(path).map_err(|e| (UNREADABLE, format!("cannot open: {e}")))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size > MAX_FILE_BYTES {
        return Err(too_large(size));
    }
    // The size can change between the stat and the read: read at most one byte past the limit.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| (UNREADABLE, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| (UNREADABLE, format!("not UTF-8 text (invalid byte at offset {}); its objects are skipped", e.utf8_error().valid_up_to())))
}

impl ClusterState {
    /// `reads` applied to this state in order, as `kubectl apply -f` of each would leave a cluster.
    pub(crate) fn apply_reads<'a>(&mut self, reads: impl IntoIterator<Item = &'a FileRead>) {
        assemble::assemble(self, reads)
    }
}
