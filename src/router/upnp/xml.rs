//! A deliberately small XML reader for what UPnP IGD sends: device descriptions (UPnP Device
//! Architecture 1.1 §2.3) and SOAP 1.1 responses. Elements, text, CDATA and the five predefined
//! entities plus character references; namespace prefixes are dropped (UPnP names are matched by
//! local name). Everything else a router could use to hurt a parser is refused: DOCTYPE (entity
//! expansion), unknown entities, deep nesting, too many elements, unbalanced tags.

/// Deepest element nesting accepted (a real IGD description nests about 10 deep).
const MAX_DEPTH: usize = 32;
/// Most elements accepted in one document (a real IGD description has a few hundred).
const MAX_ELEMENTS: usize = 4096;

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("XML ends in the middle of {0}")]
    Truncated(&'static str),
    #[error("XML has a DOCTYPE declaration, which UPnP never needs (refused: entity expansion)")]
    Doctype,
    #[error("XML has an unknown entity &{0};")]
    UnknownEntity(String),
    #[error("XML closes <{found}> where <{expected}> is open")]
    Mismatched { expected: String, found: String },
    #[error("XML closes <{0}> that was never opened")]
    UnexpectedClose(String),
    #[error("XML nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
    #[error("XML has more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    #[error("XML has no root element")]
    NoRoot,
    #[error("XML has content after the root element")]
    TrailingContent,
    #[error("XML has a malformed tag near byte {0}")]
    MalformedTag(usize),
}

/// One element: its local name (prefix dropped), its text (all direct text children joined)
/// and its child elements. Attributes are not kept: UPnP carries nothing in them that
/// holepunch reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// The first direct child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|child| child.name == name)
    }

    /// The trimmed text of the first direct child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|child| child.text.trim())
    }

    /// Every element named `name` in this subtree (this one included), in document order.
    pub fn descendants<'a>(&'a self, name: &str, found: &mut Vec<&'a Element>) {
        if self.name == name {
            found.push(self);
        }
        for child in &self.children {
            child.descendants(name, found);
        }
    }

    /// The first element named `name` in this subtree, depth first.
    pub fn find(&self, name: &str) -> Option<&Element> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|child| child.find(name))
    }
}

fn local_name(name: &str) -> &str {
    name.rsplit_once(':').map_or(name, |(_, local)| local)
}

fn decode_entities(raw: &str, out: &mut String) -> Result<(), XmlError> {
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after
            .find(';')
            .filter(|&semi| semi <= 10)
            .ok_or(XmlError::Truncated("an entity"))?;
        let entity = &after[..semi];
        let decoded = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| XmlError::UnknownEntity(entity.to_owned()))?
            }
        };
        out.push(decoded);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Ok(())
}

/// The end of a tag starting at `start` (index of the closing `>`), skipping quoted attribute
/// values that may contain `>`.
fn tag_end(doc: &str, start: usize) -> Result<usize, XmlError> {
    let mut quote: Option<u8> = None;
    for (offset, &byte) in doc.as_bytes()[start..].iter().enumerate() {
        match (quote, byte) {
            (Some(q), b) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(byte),
            (None, b'>') => return Ok(start + offset),
            (None, b'<') => return Err(XmlError::MalformedTag(start)),
            (None, _) => {}
        }
    }
    Err(XmlError::Truncated("a tag"))
}

/// Parses `doc` into its root element.
pub fn parse(doc: &str) -> Result<Element, XmlError> {
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    let mut pos = 0usize;
    let bytes = doc.as_bytes();
    while pos < doc.len() {
        if bytes[pos] != b'<' {
            let end = doc[pos..].find('<').map_or(doc.len(), |i| pos + i);
            let text = &doc[pos..end];
            match stack.last_mut() {
                Some(open) => decode_entities(text, &mut open.text)?,
                None if text.trim().is_empty() => {}
                None if root.is_some() => return Err(XmlError::TrailingContent),
                None => return Err(XmlError::MalformedTag(pos)),
            }
            pos = end;
            continue;
        }
        let rest = &doc[pos..];
        if rest.starts_with("<?") {
            let end = rest
                .find("?>")
                .ok_or(XmlError::Truncated("a processing instruction"))?;
            pos += end + 2;
        } else if rest.starts_with("<!--") {
            let end = rest.find("-->").ok_or(XmlError::Truncated("a comment"))?;
            pos += end + 3;
        } else if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
            let end = cdata.find("]]>").ok_or(XmlError::Truncated("CDATA"))?;
            let open = stack.last_mut().ok_or(XmlError::MalformedTag(pos))?;
            open.text.push_str(&cdata[..end]);
            pos += "<![CDATA[".len() + end + 3;
        } else if rest.starts_with("<!") {
            return Err(XmlError::Doctype);
        } else if rest.starts_with("</") {
            let end = tag_end(doc, pos + 1)?;
            let name = local_name(doc[pos + 2..end].trim());
            let open = stack
                .pop()
                .ok_or_else(|| XmlError::UnexpectedClose(name.to_owned()))?;
            if open.name != name {
                return Err(XmlError::Mismatched {
                    expected: open.name,
                    found: name.to_owned(),
                });
            }
            match stack.last_mut() {
                Some(parent) => parent.children.push(open),
                None if root.is_none() => root = Some(open),
                None => return Err(XmlError::TrailingContent),
            }
            pos = end + 1;
        } else {
            let end = tag_end(doc, pos + 1)?;
            let inner = &doc[pos + 1..end];
            let (inner, self_closing) = match inner.strip_suffix('/') {
                Some(inner) => (inner, true),
                None => (inner, false),
            };
            let name = inner
                .split(|c: char| c.is_ascii_whitespace())
                .next()
                .filter(|name| !name.is_empty())
                .ok_or(XmlError::MalformedTag(pos))?;
            elements += 1;
            if elements > MAX_ELEMENTS {
                return Err(XmlError::TooManyElements);
            }
            if root.is_some() && stack.is_empty() {
                return Err(XmlError::TrailingContent);
            }
            let element = Element {
                name: local_name(name).to_owned(),
                ..Element::default()
            };
            if self_closing {
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => root = Some(element),
                }
            } else {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                stack.push(element);
            }
            pos = end + 1;
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Truncated("an element"));
    }
    root.ok_or(XmlError::NoRoot)
}

/// Escapes text for an element body or attribute value.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_elements_text_entities_and_cdata() {
        let doc = r#"<?xml version="1.0"?>
<!-- a comment -->
<s:Envelope xmlns:s="x" s:encodingStyle="a>b"><s:Body>
  <u:R xmlns:u="y"><A>1 &lt; 2 &amp;&#65;&#x42;</A><B/><C><![CDATA[<raw>]]></C></u:R>
</s:Body></s:Envelope>"#;
        let root = parse(doc).unwrap();
        assert_eq!(root.name, "Envelope");
        let response = root.find("R").unwrap();
        assert_eq!(response.child_text("A"), Some("1 < 2 &AB"));
        assert_eq!(response.child_text("B"), Some(""));
        assert_eq!(response.child_text("C"), Some("<raw>"));
        let mut found = Vec::new();
        root.descendants("A", &mut found);
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn hostile_documents_are_errors() {
        let cases: &[(&str, XmlError)] = &[
            ("", XmlError::NoRoot),
            ("<a>", XmlError::Truncated("an element")),
            (
                "<a></b>",
                XmlError::Mismatched {
                    expected: "a".into(),
                    found: "b".into(),
                },
            ),
            ("</a>", XmlError::UnexpectedClose("a".into())),
            ("<a>&bogus;</a>", XmlError::UnknownEntity("bogus".into())),
            ("<a>&#xD800;</a>", XmlError::UnknownEntity("#xD800".into())),
            ("<a>&amp</a>", XmlError::Truncated("an entity")),
            (
                "<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
                XmlError::Doctype,
            ),
            ("<a/><b/>", XmlError::TrailingContent),
            ("<a></a>junk", XmlError::TrailingContent),
            ("<a x=\"unterminated></a>", XmlError::Truncated("a tag")),
            ("<a <b>", XmlError::MalformedTag(1)),
            ("<>", XmlError::MalformedTag(0)),
            ("<a><!-- x", XmlError::Truncated("a comment")),
            ("<a><![CDATA[x", XmlError::Truncated("CDATA")),
            ("<?xml", XmlError::Truncated("a processing instruction")),
        ];
        for (doc, expected) in cases {
            assert_eq!(parse(doc).as_ref(), Err(expected), "{doc:?}");
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(XmlError::TooDeep));
        let wide = format!("<a>{}</a>", "<b/>".repeat(MAX_ELEMENTS));
        assert_eq!(parse(&wide), Err(XmlError::TooManyElements));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Every prefix of a realistic document, and a few byte soups.
        let doc = "<?xml?><r><a x='1'>t&amp;<![CDATA[c]]></a><!--c--><b/></r>";
        for end in 0..=doc.len() {
            if doc.is_char_boundary(end) {
                let _ = parse(&doc[..end]);
            }
        }
        for soup in [
            "<<<>>>",
            "<a/ >",
            "<a></a/>",
            "&&&",
            "<a>\u{0}</a>",
            "<![CDATA[]]>",
        ] {
            let _ = parse(soup);
        }
    }

    #[test]
    fn escape_round_trips() {
        let text = "holepunch:<ns>/\"a\" & 'b'";
        let doc = format!("<a>{}</a>", escape(text));
        assert_eq!(parse(&doc).unwrap().text, text);
    }
}
