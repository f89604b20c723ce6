//! A bounded reader for YAML (and JSON) annotation values: Istio's `proxy.istio.io/config`,
//! Kuma's `traffic.kuma.io/transparent-proxy-config`.
//!
//! Pod annotations are written by whoever may create a pod, so their values are hostile input.
//! A YAML alias re-uses a node already built; a few kilobytes of anchors and aliases expand to
//! gigabytes in a reader that builds the expanded tree (docs/ARCHITECTURE.md, pitfall 60).
//! This reader looks at the parser's events (`saphyr-parser`, safe Rust, no tree of its own)
//! and builds its small tree itself, so the bounds hold before anything is allocated:
//!
//! - an anchor (`&name`) or alias (`*name`) is an error: nothing a ProxyConfig or Kuma's
//!   config needs, and the only way YAML expands beyond its text;
//! - at most [`MAX_DEPTH`] nested collections and [`MAX_NODES`] nodes;
//! - one document; mapping keys are scalars and unique.
//!
//! Everything kept is a piece of the input text, so memory stays within a small multiple of
//! the value's length (itself capped by the caller), and the work is one pass over the events.

use std::collections::BTreeMap;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// Most nested sequences and mappings: the configs we read are three levels deep.
pub(crate) const MAX_DEPTH: usize = 32;
/// Most nodes (scalars, sequences, mappings) in one value.
pub(crate) const MAX_NODES: usize = 10_000;

/// One node of the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// A scalar's text; `plain` when it was written without quotes (only plain scalars can be
    /// numbers or null).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(BTreeMap<String, Node>),
}

impl Node {
    /// YAML's null: an empty plain scalar, `~` or `null`.
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A plain decimal integer.
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Node::Scalar { text, plain: true }
                if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                text.parse().ok()
            }
            _ => None,
        }
    }

    /// The text of any scalar.
    pub(crate) fn as_scalar(&self) -> Option<&str> {
        match self {
            Node::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// A mapping's entry, if this is a mapping holding `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(m) => m.get(key),
            _ => None,
        }
    }
}

/// A collection being built.
enum Frame {
    Seq(Vec<Node>),
    /// The entries so far and the key waiting for its value.
    Map(BTreeMap<String, Node>, Option<String>),
}

/// Parses `text` as one YAML document (JSON is YAML) within the bounds above. An empty
/// document is a null scalar. The error says why, without echoing the value.
pub(crate) fn parse(text: &str) -> Result<Node, String> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut nodes = 0usize;
    let mut documents = 0usize;
    for ev in Parser::new_from_str(text) {
        let (ev, _span) = ev.map_err(|e| format!("not YAML or JSON: {e}"))?;
        let mut count = |anchor: usize| -> Result<(), String> {
            if anchor != 0 {
                return Err("YAML anchors (&name) are not accepted".into());
            }
            nodes += 1;
            if nodes > MAX_NODES {
                return Err(format!("more than {MAX_NODES} YAML nodes"));
            }
            Ok(())
        };
        let done = match ev {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err("more than one YAML document".into());
                }
                None
            }
            Event::Alias(_) => return Err("YAML aliases (*name) are not accepted".into()),
            Event::Scalar(v, style, anchor, _tag) => {
                count(anchor)?;
                Some(Node::Scalar {
                    text: v.into_owned(),
                    plain: style == ScalarStyle::Plain,
                })
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                count(anchor)?;
                if stack.len() >= MAX_DEPTH {
                    return Err(format!("nested deeper than {MAX_DEPTH} levels"));
                }
                stack.push(if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq(Vec::new())
                } else {
                    Frame::Map(BTreeMap::new(), None)
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq(v)) => Some(Node::Seq(v)),
                Some(Frame::Map(m, None)) => Some(Node::Map(m)),
                Some(Frame::Map(_, Some(k))) => {
                    return Err(format!("key {:?} has no value", cut(&k)))
                }
                None => return Err("unbalanced YAML collections".into()),
            },
        };
        if let Some(node) = done {
            match stack.last_mut() {
                None if root.is_none() => root = Some(node),
                None => return Err("more than one YAML document".into()),
                Some(Frame::Seq(v)) => v.push(node),
                Some(Frame::Map(m, pending)) => match pending.take() {
                    None => match node {
                        Node::Scalar { text, .. } => *pending = Some(text),
                        _ => return Err("mapping keys must be scalars".into()),
                    },
                    Some(k) => {
                        if m.contains_key(&k) {
                            return Err(format!("duplicate key {:?}", cut(&k)));
                        }
                        m.insert(k, node);
                    }
                },
            }
        }
    }
    Ok(root.unwrap_or(Node::Scalar {
        text: String::new(),
        plain: true,
    }))
}

/// A key for an error message: at most 64 characters.
fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn scalar(s: &str) -> Node {
        Node::Scalar {
            text: s.into(),
            plain: true,
        }
    }

    #[test]
    fn yaml_and_json_read_alike() {
        let y = parse("a:\n  b: 2\n  c: [1, \"x\"]\n  d: {}\n").unwrap();
        let j = parse(r#"{"a": {"b": 2, "c": [1, "x"], "d": {}}}"#).unwrap();
        let b = |n: &Node| n.get("a").and_then(|a| a.get("b")).and_then(Node::as_u64);
        assert_eq!(b(&y), Some(2));
        assert_eq!(b(&j), Some(2));
        let c = |n: &Node| n.get("a").and_then(|a| a.get("c")).cloned();
        match c(&y).unwrap() {
            Node::Seq(v) => {
                assert_eq!(v[0], scalar("1"));
                assert_eq!(v[1].as_scalar(), Some("x"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            y.get("a").and_then(|a| a.get("d")),
            Some(&Node::Map(BTreeMap::new()))
        );
        assert!(parse("").unwrap().is_null());
        assert!(parse("~").unwrap().is_null());
        assert_eq!(parse("'7'").unwrap().as_u64(), None, "quoted is a string");
    }

    #[test]
    fn anchors_aliases_and_excess_are_refused() {
        for (text, want) in [
            ("a: &x 1\nb: *x\n", "anchors"),
            ("a: &x [1]\n", "anchors"),
            ("a: &x {}\n", "anchors"),
            ("- *x\n", "anchor"),
            ("a: 1\na: 2\n", "duplicate key"),
            ("? [1]\n: 2\n", "keys must be scalars"),
            ("a: 1\n---\nb: 2\n", "more than one"),
            ("a: [1, 2\n", "not YAML"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(parse(&deep).unwrap_err().contains("deeper"));
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        parse(&ok).unwrap();
        let many = format!("[{}]", vec!["1"; MAX_NODES].join(","));
        assert!(parse(&many).unwrap_err().contains("nodes"));
        let fits = format!("[{}]", vec!["1"; MAX_NODES - 1].join(","));
        parse(&fits).unwrap();
    }

    /// The issue's bombs: a 32,000-character anchored scalar, 1,000 aliases of it in a list,
    /// 1,000 aliases of that list, plus padding aliases. Refused at the first anchor, in
    /// microseconds, whatever follows.
    #[test]
    fn alias_bomb_is_refused_without_expansion() {
        let bomb = alias_bomb();
        assert!(bomb.len() > 60_000, "{}", bomb.len());
        let t = std::time::Instant::now();
        let e = parse(&bomb).unwrap_err();
        assert!(e.contains("anchors"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_millis(500));
    }

    /// The ~62 KB bomb of the issue (it asked serde_yaml for about 30 GB).
    pub(crate) fn alias_bomb() -> String {
        let mut s = format!("a: &a \"{}\"\n", "x".repeat(32_000));
        s += &format!("b: &b [{}]\n", vec!["*a"; 1000].join(","));
        s += &format!("c: [{}]\n", vec!["*b"; 1000].join(","));
        s += &format!("d: [{}]\n", vec!["*a"; 8010].join(","));
        s
    }
}
