//! A file's text as YAML documents, each with the line it starts on, and the nesting check that runs before
//! serde_yaml sees a document.
use super::MAX_DEPTH;

/// One document of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Document<'a> {
    pub text: &'a str,
    /// The file's line number of `text`'s first line (1-based): serde_yaml counts lines from there.
    pub first_line: usize,
    /// The first line with content (not blank, not a comment): where the object is said to be.
    pub line: usize,
}

/// Splits a file at `---` lines, as kubectl and istioctl do (a line that is `---` and nothing else but
/// spaces): each document is then read on its own, so a broken one costs only itself. Documents with no
/// content are left out.
pub(super) fn split(text: &str) -> Vec<Document<'_>> {
    let mut out = Vec::new();
    let (mut start, mut first_line, mut content) = (0, 1, None);
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let number = index + 1;
        if line.trim_end() == "---" {
            push(&mut out, &text[start..offset], first_line, content);
            (start, first_line, content) = (offset + line.len(), number + 1, None);
        } else if content.is_none() && !is_blank_or_comment(line) {
            content = Some(number);
        }
        offset += line.len();
    }
    push(&mut out, &text[start..], first_line, content);
    out
}

fn push<'a>(out: &mut Vec<Document<'a>>, text: &'a str, first_line: usize, content: Option<usize>) {
    if let Some(line) = content {
        out.push(Document { text, first_line, line });
    }
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

/// `Err(line)` (1-based, in `text`) where `text` nests collections deeper than [`MAX_DEPTH`].
///
/// Why before parsing: serde_yaml checks its recursion limit (128) only after its loader has buffered
/// every event of the document, and libyaml's scanner, while producing them, walks its stack of "simple
/// key" candidates — one per open flow collection (`[`, `{`) — for every token: cost is tokens × flow depth,
/// quadratic for `{"a":{"a":…` 100k deep (165 s for 500 KB). Flow depth cannot exceed the number of `[`/`{`
/// characters, so most documents pass on that count alone; the rest are measured exactly by running
/// libyaml's own event parser, which stops at the first event past the limit — by then every token has
/// cost at most [`MAX_DEPTH`] steps. Block nesting is cheap for libyaml and is bounded while values are
/// read (see `value.rs`).
pub(super) fn check_depth(text: &str) -> Result<(), usize> {
    let openers = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    if openers <= MAX_DEPTH {
        return Ok(());
    }
    match first_too_deep(text) {
        Some(line) => Err(line),
        None => Ok(()),
    }
}

/// Runs libyaml's parser over `text` and returns the line of the first collection nested deeper than
/// [`MAX_DEPTH`]; `None` if there is none, or if libyaml finds a syntax error first (serde_yaml then reports
/// it, having done no more work than this up to that point).
fn first_too_deep(text: &str) -> Option<usize> {
    let mut parser = Parser::new(text)?;
    let mut depth = 0usize;
    loop {
        match parser.next()? {
            Step::Open(line) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(line);
                }
            }
            Step::Close => depth = depth.saturating_sub(1),
            Step::Other => {}
            Step::End => return None,
        }
    }
}

enum Step {
    Open(usize),
    Close,
    Other,
    End,
}

/// A libyaml parser over a borrowed string. Boxed: libyaml keeps a pointer to the parser itself (its read
/// handler's data), so it must not move once the input is set.
struct Parser<'a> {
    sys: Box<std::mem::MaybeUninit<unsafe_libyaml::yaml_parser_t>>,
    _input: std::marker::PhantomData<&'a str>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Option<Self> {
        let mut sys = Box::new(std::mem::MaybeUninit::<unsafe_libyaml::yaml_parser_t>::uninit());
        // SAFETY: yaml_parser_initialize fully initializes the (boxed, never moved) parser; on failure it
        // owns nothing and is not used. The input outlives the parser (`'a`); a &str's pointer is never null.
        unsafe {
            if unsafe_libyaml::yaml_parser_initialize(sys.as_mut_ptr()).fail {
                return None;
            }
            unsafe_libyaml::yaml_parser_set_input_string(sys.as_mut_ptr(), text.as_ptr(), text.len() as u64);
        }
        Some(Parser { sys, _input: std::marker::PhantomData })
    }

    /// The next event's kind; `None` on a syntax error.
    fn next(&mut self) -> Option<Step> {
        let mut event = std::mem::MaybeUninit::<unsafe_libyaml::yaml_event_t>::uninit();
        // SAFETY: the parser is initialized; yaml_parser_parse initializes `event` when it succeeds, and the
        // event is deleted (its allocations freed) right after its type and mark are copied out.
        unsafe {
            if unsafe_libyaml::yaml_parser_parse(self.sys.as_mut_ptr(), event.as_mut_ptr()).fail {
                return None;
            }
            let event = event.as_mut_ptr();
            let step = match (*event).type_ {
                unsafe_libyaml::YAML_SEQUENCE_START_EVENT | unsafe_libyaml::YAML_MAPPING_START_EVENT => {
                    Step::Open((*event).start_mark.line as usize + 1)
                }
                unsafe_libyaml::YAML_SEQUENCE_END_EVENT | unsafe_libyaml::YAML_MAPPING_END_EVENT => Step::Close,
                unsafe_libyaml::YAML_STREAM_END_EVENT => Step::End,
                _ => Step::Other,
            };
            unsafe_libyaml::yaml_event_delete(event);
            Some(step)
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: initialized in `new` and deleted only here.
        unsafe { unsafe_libyaml::yaml_parser_delete(self.sys.as_mut_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_separator_lines_and_numbers_from_the_first_content_line() {
        let text = "# header\n\napiVersion: v1\nkind: A\n---\n---  \n# only a comment\n--- # not a separator\nkind: B\n---\nkind: C";
        let docs = split(text);
        let lines: Vec<_> = docs.iter().map(|d| (d.first_line, d.line)).collect();
        assert_eq!(lines, [(1, 3), (7, 8), (11, 11)]);
        assert_eq!(docs[0].text, "# header\n\napiVersion: v1\nkind: A\n");
        assert_eq!(docs[2].text, "kind: C");
        // Control: a separator needs the line to itself; indented or followed by text it is content.
        assert_eq!(split("a: 1\n  ---\nb: 2\n").len(), 1);
    }

    #[test]
    fn nesting_past_the_limit_is_found_cheaply_and_shallow_flow_passes() {
        let deep = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        let started = std::time::Instant::now();
        assert_eq!(check_depth(&deep), Err(1));
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        // Many brackets, but shallow: measured exactly, accepted.
        let wide = format!("a: [{}]\n", vec!["{b: [1]}"; 200].join(", "));
        assert_eq!(check_depth(&wide), Ok(()));
        // Exactly at the limit passes; one deeper does not, and the line is the deep collection's.
        let at = |n: usize| format!("# c\n{}{}\n", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_depth(&at(MAX_DEPTH)), Ok(()));
        assert_eq!(check_depth(&at(MAX_DEPTH + 1)), Err(2));
        // A syntax error before any depth: left to serde_yaml to report.
        assert_eq!(check_depth(&format!("a: ]{}", "[".repeat(100))), Ok(()));
    }
}
