//! HTML ticket bodies (Pylon `body_html`, `message_html`) to tidy plain text.
//!
//! Conversion uses a real HTML parser (`html2text` on html5ever) with a trivial decorator, so
//! malformed markup parses the way browsers parse it. html5ever is quadratic in nesting depth, so
//! the input is first capped at [`MAX_HTML_BYTES`] and then rewritten by a linear pre-pass
//! (`bound_nesting`) into a balanced tag stream whose nesting never exceeds a fixed depth.

use std::collections::HashMap;

/// Max input bytes converted; longer input is cut at a char boundary first.
pub const MAX_HTML_BYTES: usize = 256 * 1024;

/// Max nesting kept by the pre-pass, in parser stack entries (a cell or row also counts the
/// `tbody`/`tr` the parser implies when they are missing). Deeper tags are dropped, their text
/// is kept.
const MAX_DEPTH: usize = 100;

/// Leading whitespace kept per output line (nested `<dd>`s indent by two per level).
const MAX_INDENT: usize = 16;

/// Render width handed to html2text: wider than any line the capped input can produce, so
/// nothing is wrapped.
const RENDER_WIDTH: usize = MAX_HTML_BYTES + 1;

/// HTML (a ticket body) to tidy plain text with a real HTML parser (html2text, trivial decorator,
/// no wrapping).
///
/// Entities are decoded once, U+00A0 becomes a space, `<br>`/`<p>`/`<div>`/`<li>`/headings become
/// line breaks, `script`/`style`/`head` are dropped, trailing spaces are trimmed per line, runs of
/// three or more newlines collapse to two and the result is trimmed.
///
/// Bounded: the input is cut to [`MAX_HTML_BYTES`] and tag nesting is capped by a linear pre-pass
/// before parsing, so hostile bodies (a megabyte of nested `<div>`s) convert in tens of
/// milliseconds in release builds.
/// Never panics; returns `""` for input with no text.
pub fn html_to_text(html: &str) -> String {
    let input = truncate_at_char_boundary(html, MAX_HTML_BYTES);
    if input.trim().is_empty() {
        return String::new();
    }
    let bounded = bound_nesting(input);
    let rendered = render(&bounded).or_else(|| render(&text_only(&bounded)));
    rendered.map(|s| tidy(&s)).unwrap_or_default()
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn truncate_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Runs html2text; `None` on an error or a panic inside the library.
fn render(html: &str) -> Option<String> {
    std::panic::catch_unwind(|| {
        html2text::config::with_decorator(html2text::render::TrivialDecorator::new())
            .raw_mode(true)
            .unicode_strikeout(false)
            .allow_width_overflow()
            .string_from_read(html.as_bytes(), RENDER_WIDTH)
            .ok()
    })
    .ok()
    .flatten()
}

/// Last-resort input when rendering the bounded HTML failed: its text with tags replaced by
/// line breaks (the pre-pass output has `<` only at tag starts).
fn text_only(bounded: &str) -> String {
    let mut out = String::with_capacity(bounded.len());
    let mut rest = bounded;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        match rest[lt..].find('>') {
            Some(gt) => {
                out.push_str("<br>");
                rest = &rest[lt + gt + 1..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Non-breaking spaces to spaces, trailing whitespace trimmed per line, leading whitespace capped
/// at [`MAX_INDENT`], at most one blank line in a row, the whole result trimmed and capped at
/// [`MAX_HTML_BYTES`].
fn tidy(text: &str) -> String {
    let text = text.replace('\u{a0}', " ");
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0usize;
    for line in text.lines() {
        let line = line.trim_end();
        let body = line.trim_start();
        if body.is_empty() {
            blank_run += 1;
            if blank_run == 1 {
                out.push('\n');
            }
            continue;
        }
        blank_run = 0;
        let indent = &line[..line.len() - body.len()];
        let kept = indent
            .char_indices()
            .nth(MAX_INDENT)
            .map_or(indent, |(i, _)| &indent[..i]);
        out.push_str(kept);
        out.push_str(body);
        out.push('\n');
    }
    truncate_at_char_boundary(out.trim(), MAX_HTML_BYTES)
        .trim_end()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Linear pre-pass: a balanced, depth-capped tag stream.
// ---------------------------------------------------------------------------------------------

/// Elements that never have content (no end tag, never on the parser's stack).
#[rustfmt::skip]
const VOID: &[&str] = &[
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "hr", "img", "input", "keygen",
    "link", "meta", "param", "source", "track", "wbr",
];

/// Raw-text elements dropped with their content (never rendered as text anyway).
#[rustfmt::skip]
const DROP_WITH_CONTENT: &[&str] = &[
    "script", "style", "title", "iframe", "noembed", "noframes", "template",
];

/// Raw-text elements whose content is kept as plain text (the tags themselves are dropped).
const CONTENT_AS_TEXT: &[&str] = &["textarea", "xmp"];

/// Document-level tags the parser implies on its own; they are dropped.
const DOCUMENT: &[&str] = &["html", "head", "body", "frameset", "frame"];

/// Start tags that close an open `<p>` (HTML "in body" rules).
#[rustfmt::skip]
const CLOSES_P: &[&str] = &[
    "address", "article", "aside", "blockquote", "center", "details", "dialog", "dir", "div",
    "dl", "fieldset", "figcaption", "figure", "footer", "header", "hgroup", "main", "menu", "nav",
    "ol", "p", "search", "section", "summary", "ul", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
    "listing", "form", "hr", "dd", "dt", "li",
];

/// Elements that end the search for an open `<p>` to close ("button scope").
#[rustfmt::skip]
const P_SCOPE_BARRIER: &[&str] = &[
    "applet", "caption", "html", "table", "td", "th", "marquee", "object", "template", "button",
];

/// Special elements (subset) that end the search for an open `<li>`/`<dd>`/`<dt>`.
#[rustfmt::skip]
const LIST_BARRIER: &[&str] = &[
    "applet", "caption", "table", "td", "th", "tr", "marquee", "object", "template", "ol", "ul",
    "dl", "blockquote", "section", "article", "aside", "nav", "fieldset", "figure", "form",
    "button", "select",
];

const HEADINGS: &[&str] = &["h1", "h2", "h3", "h4", "h5", "h6"];

fn is_one_of(name: &str, set: &[&str]) -> bool {
    set.contains(&name)
}

/// Parser stack entries an element may occupy when opened inside `parent`: a cell or a row also
/// counts the `tbody`/`tr` the parser implies when they are missing.
fn weight(name: &str, parent: Option<&str>) -> usize {
    let in_section = matches!(parent, Some("tbody" | "thead" | "tfoot"));
    match name {
        "td" | "th" if parent == Some("tr") => 1,
        "td" | "th" if in_section => 2,
        "td" | "th" => 3,
        "tr" if in_section => 1,
        "tr" => 2,
        _ => 1,
    }
}

/// A tag as tokenised by [`scan_tag`].
struct Tag {
    /// Lowercased name (`None` when it is not a plain `[a-z][a-z0-9-]*` name).
    name: Option<String>,
    /// Attributes kept (lowercased name, raw value).
    attrs: Vec<(String, String)>,
    /// Byte index just after the closing `>`.
    end: usize,
}

/// The pre-pass state: the output and the stack of elements it has opened.
struct Bounder {
    out: String,
    /// Open elements with their weights.
    stack: Vec<(String, usize)>,
    /// Sum of the weights on the stack.
    depth: usize,
    /// Start tags dropped for depth, by name, so their end tags are dropped too.
    dropped: HashMap<String, usize>,
}

impl Bounder {
    fn close_top(&mut self) {
        if let Some((name, w)) = self.stack.pop() {
            self.depth = self.depth.saturating_sub(w);
            self.out.push_str("</");
            self.out.push_str(&name);
            self.out.push('>');
        }
    }

    /// Closes everything above and including the stack entry at `idx`.
    fn close_to(&mut self, idx: usize) {
        while self.stack.len() > idx {
            self.close_top();
        }
    }

    /// Index of the topmost `name` (any of `names`) above the first barrier element.
    fn find_open(&self, names: &[&str], barrier: &[&str]) -> Option<usize> {
        for (i, (open, _)) in self.stack.iter().enumerate().rev() {
            if is_one_of(open, names) {
                return Some(i);
            }
            if is_one_of(open, barrier) {
                return None;
            }
        }
        None
    }

    /// The implicit closes the HTML parser would do before this start tag.
    fn implicit_closes(&mut self, name: &str) {
        if is_one_of(name, CLOSES_P) {
            if let Some(i) = self.find_open(&["p"], P_SCOPE_BARRIER) {
                self.close_to(i);
            }
        }
        let found = match name {
            "li" => self.find_open(&["li"], LIST_BARRIER),
            "dd" | "dt" => self.find_open(&["dd", "dt"], LIST_BARRIER),
            "tr" => self.find_open(&["tr"], &["table"]),
            "td" | "th" => self.find_open(&["td", "th"], &["tr", "table"]),
            "tbody" | "thead" | "tfoot" => self.find_open(&["tbody", "thead", "tfoot"], &["table"]),
            "option" => self.find_open(&["option"], &["select", "optgroup", "datalist"]),
            "optgroup" => self.find_open(&["optgroup", "option"], &["select"]),
            "a" => self.find_open(&["a"], P_SCOPE_BARRIER),
            _ if is_one_of(name, HEADINGS) => match self.stack.last() {
                Some((top, _)) if is_one_of(top, HEADINGS) => Some(self.stack.len() - 1),
                _ => None,
            },
            _ => None,
        };
        if let Some(i) = found {
            self.close_to(i);
        }
    }

    fn emit_start(&mut self, name: &str, attrs: &[(String, String)]) {
        self.out.push('<');
        self.out.push_str(name);
        for (k, v) in attrs {
            self.out.push(' ');
            self.out.push_str(k);
            self.out.push_str("=\"");
            self.out.push_str(&v.replace('"', "&quot;"));
            self.out.push('"');
        }
        self.out.push('>');
    }

    fn start_tag(&mut self, name: &str, attrs: &[(String, String)]) {
        if is_one_of(name, VOID) {
            self.emit_start(name, attrs);
            return;
        }
        self.implicit_closes(name);
        let w = weight(name, self.stack.last().map(|(n, _)| n.as_str()));
        if self.depth + w > MAX_DEPTH {
            *self.dropped.entry(name.to_string()).or_insert(0) += 1;
            return;
        }
        self.emit_start(name, attrs);
        self.stack.push((name.to_string(), w));
        self.depth += w;
    }

    fn end_tag(&mut self, name: &str) {
        if name == "br" {
            // The parser treats `</br>` as `<br>`.
            self.out.push_str("<br>");
            return;
        }
        if let Some(n) = self.dropped.get_mut(name) {
            if *n > 0 {
                *n -= 1;
                return;
            }
        }
        if let Some(i) = self.stack.iter().rposition(|(open, _)| open == name) {
            self.close_to(i);
        }
        // An end tag with no open element is dropped.
    }
}

fn is_html_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | b'\x0c' | b'\r' | b' ')
}

/// Tokenises the tag whose name starts at `i` (just after `<` or `</`) following the HTML
/// tokenizer's tag and attribute states. `None` when the input ends inside the tag (the parser
/// drops such a tag).
fn scan_tag(s: &str, mut i: usize, keep_attrs: &[&str]) -> Option<Tag> {
    let b = s.as_bytes();
    let name_start = i;
    while i < b.len() && !is_html_space(b[i]) && b[i] != b'/' && b[i] != b'>' {
        i += 1;
    }
    let raw_name = &s[name_start..i];
    let name = {
        let lower = raw_name.to_ascii_lowercase();
        let valid = lower.bytes().next().is_some_and(|c| c.is_ascii_lowercase())
            && lower
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        valid.then_some(lower)
    };
    let mut attrs = Vec::new();
    loop {
        // Before attribute name.
        while i < b.len() && (is_html_space(b[i]) || b[i] == b'/') {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        if b[i] == b'>' {
            return Some(Tag {
                name,
                attrs,
                end: i + 1,
            });
        }
        // Attribute name (the first character may be '=').
        let an_start = i;
        i += 1;
        while i < b.len() && !is_html_space(b[i]) && !matches!(b[i], b'/' | b'>' | b'=') {
            i += 1;
        }
        let attr_name = s[an_start..i].to_ascii_lowercase();
        // After attribute name.
        while i < b.len() && is_html_space(b[i]) {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        if b[i] != b'=' {
            continue; // '/', '>' or the next attribute name
        }
        i += 1;
        // Before attribute value.
        while i < b.len() && is_html_space(b[i]) {
            i += 1;
        }
        if i >= b.len() {
            return None;
        }
        let value = match b[i] {
            b'>' => "",
            q @ (b'"' | b'\'') => {
                let v_start = i + 1;
                let close = s[v_start..].bytes().position(|c| c == q)?;
                i = v_start + close + 1;
                &s[v_start..v_start + close]
            }
            _ => {
                let v_start = i;
                while i < b.len() && !is_html_space(b[i]) && b[i] != b'>' {
                    i += 1;
                }
                &s[v_start..i]
            }
        };
        if is_one_of(&attr_name, keep_attrs) && !attrs.iter().any(|(k, _)| *k == attr_name) {
            attrs.push((attr_name, value.to_string()));
        }
    }
}

/// Byte index of the `<` of the first `</name` (case-insensitive, followed by a tag delimiter)
/// at or after `from`, or the input length.
fn find_end_tag(s: &str, from: usize, name: &str) -> usize {
    let b = s.as_bytes();
    let mut i = from;
    while let Some(off) = s.get(i..).and_then(|rest| rest.find("</")) {
        let at = i + off;
        let name_end = at + 2 + name.len();
        if let Some(candidate) = b.get(at + 2..name_end) {
            if candidate.eq_ignore_ascii_case(name.as_bytes())
                && b.get(name_end)
                    .is_none_or(|&c| is_html_space(c) || c == b'/' || c == b'>')
            {
                return at;
            }
        }
        i = at + 2;
    }
    s.len()
}

/// Byte index just after the first `>` at or after `from`, or the input length.
fn skip_past_gt(s: &str, from: usize) -> usize {
    s.get(from..)
        .and_then(|rest| rest.find('>'))
        .map_or(s.len(), |p| from + p + 1)
}

/// Rewrites `html` into a stream the HTML parser cannot nest deeply: comments, doctypes and
/// processing instructions are dropped, a stray `<` becomes `&lt;`, attributes are dropped except
/// `img alt/src` and `ol start`, every end tag closes what the pre-pass opened above it (so the
/// stream is balanced), and start tags beyond [`MAX_DEPTH`] are dropped (their text stays).
/// Linear in the input size (the stack is bounded by [`MAX_DEPTH`]).
pub(crate) fn bound_nesting(html: &str) -> String {
    let b = html.as_bytes();
    let mut st = Bounder {
        out: String::with_capacity(html.len() + html.len() / 8),
        stack: Vec::new(),
        depth: 0,
        dropped: HashMap::new(),
    };
    let mut i = 0usize;
    while i < b.len() {
        let Some(off) = html[i..].find('<') else {
            st.out.push_str(&html[i..]);
            break;
        };
        st.out.push_str(&html[i..i + off]);
        i += off;
        let next = b.get(i + 1).copied();
        let next2 = b.get(i + 2).copied();
        match next {
            Some(c) if c.is_ascii_alphabetic() => {
                let Some(tag) = scan_tag(html, i + 1, &["alt", "src", "start"]) else {
                    break; // EOF inside a tag: the parser drops it
                };
                i = tag.end;
                let Some(name) = tag.name else { continue };
                if is_one_of(&name, DOCUMENT) {
                    continue;
                }
                if is_one_of(&name, DROP_WITH_CONTENT) {
                    i = find_end_tag(html, i, &name);
                    continue;
                }
                if is_one_of(&name, CONTENT_AS_TEXT) {
                    let end = find_end_tag(html, i, &name);
                    st.out.push_str(&html[i..end].replace('<', "&lt;"));
                    i = end;
                    continue;
                }
                if name == "plaintext" {
                    st.out.push_str(&html[i..].replace('<', "&lt;"));
                    break;
                }
                let name = if name == "image" {
                    "img".to_string()
                } else {
                    name
                };
                let attrs: Vec<(String, String)> = match name.as_str() {
                    "img" => tag
                        .attrs
                        .into_iter()
                        .filter(|(k, _)| k != "start")
                        .collect(),
                    "ol" => tag
                        .attrs
                        .into_iter()
                        .filter(|(k, _)| k == "start")
                        .collect(),
                    _ => Vec::new(),
                };
                st.start_tag(&name, &attrs);
            }
            Some(b'/') => match next2 {
                Some(c) if c.is_ascii_alphabetic() => {
                    let Some(tag) = scan_tag(html, i + 2, &[]) else {
                        break;
                    };
                    i = tag.end;
                    if let Some(name) = tag.name {
                        st.end_tag(&name);
                    }
                }
                Some(b'>') => i += 3,
                None => {
                    st.out.push_str("&lt;/");
                    i += 2;
                }
                _ => i = skip_past_gt(html, i + 2), // bogus comment
            },
            Some(b'!') if html[i..].starts_with("<!--") => {
                let body = i + 4;
                i = if html[body..].starts_with('>') {
                    body + 1
                } else if html[body..].starts_with("->") {
                    body + 2
                } else {
                    let a = html[body..].find("-->").map(|p| body + p + 3);
                    let b2 = html[body..].find("--!>").map(|p| body + p + 4);
                    match (a, b2) {
                        (Some(x), Some(y)) => x.min(y),
                        (Some(x), None) | (None, Some(x)) => x,
                        (None, None) => html.len(),
                    }
                };
            }
            Some(b'!' | b'?') => i = skip_past_gt(html, i + 1), // doctype, CDATA, PI
            _ => {
                st.out.push_str("&lt;");
                i += 1;
            }
        }
    }
    st.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn decodes_entities_once() {
        let html =
            "<p>Tom &amp; Jerry say &lt;hi&gt; &quot;ok&quot; &#39;x&#39; &eacute; &#x1F600;</p>";
        assert_eq!(html_to_text(html), "Tom & Jerry say <hi> \"ok\" 'x' é 😀");
    }

    #[test]
    fn double_escaped_entity_is_decoded_once() {
        assert_eq!(html_to_text("<p>a &amp;amp; b</p>"), "a &amp; b");
    }

    #[test]
    fn nbsp_becomes_space_and_trailing_spaces_go() {
        assert_eq!(html_to_text("<p>a&nbsp;&nbsp;b&nbsp;</p>"), "a  b");
        assert_eq!(html_to_text("x\u{a0}y"), "x y");
    }

    #[test]
    fn breaks_and_paragraphs() {
        assert_eq!(
            html_to_text("line one<br>line two<br/>three"),
            "line one\nline two\nthree"
        );
        assert_eq!(html_to_text("<p>one</p><p>two</p>"), "one\n\ntwo");
        assert_eq!(html_to_text("<div>a</div><div>b</div>"), "a\nb");
        assert_eq!(html_to_text("<h1>Title</h1><p>body</p>"), "Title\n\nbody");
    }

    #[test]
    fn blank_lines_collapse() {
        let out = html_to_text("<p>a</p><br><br><br><br><p>b</p>");
        assert!(!out.contains("\n\n\n"), "{out:?}");
        assert!(out.starts_with('a') && out.ends_with('b'), "{out:?}");
    }

    #[test]
    fn strikeout_is_plain() {
        assert_eq!(
            html_to_text("<s>old</s> <del>gone</del> new"),
            "old gone new"
        );
    }

    #[test]
    fn deep_indentation_is_capped() {
        let out = html_to_text(&"<dl><dd>x".repeat(50));
        assert!(out.lines().all(|l| l.len() <= MAX_INDENT + 1), "{out:?}");
    }

    #[test]
    fn lists() {
        assert_eq!(
            html_to_text("<ul><li>one</li><li>two</li></ul>"),
            "one\ntwo"
        );
        assert_eq!(html_to_text("<ol><li>one<li>two</ol>"), "one\ntwo");
        assert_eq!(
            html_to_text("<ul><li>a<ul><li>b</li></ul></li></ul>"),
            "a\nb"
        );
    }

    #[test]
    fn script_style_head_dropped() {
        let html = "<html><head><title>T</title><style>p{color:red}</style></head>\
                    <body><script>alert('x<div>')</script><p>kept</p><STYLE>x</STYLE></body></html>";
        assert_eq!(html_to_text(html), "kept");
    }

    #[test]
    fn links_images_and_tables_are_plain() {
        assert_eq!(
            html_to_text(r#"see <a href="https://x.test/">docs</a>."#),
            "see docs."
        );
        assert_eq!(
            html_to_text(r#"<img src="a.png" alt="logo"> text"#),
            "logo text"
        );
        let table = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>";
        assert_eq!(html_to_text(table), "a\nb\nc");
    }

    #[test]
    fn malformed_html() {
        assert_eq!(
            html_to_text("<p>unclosed <b>bold <i>both</p><p>next"),
            "unclosed bold both\n\nnext"
        );
        assert_eq!(html_to_text("<div><span>x</div></span>y"), "x\ny");
        assert_eq!(html_to_text("a < b and c > d"), "a < b and c > d");
        assert_eq!(html_to_text("<!-- c --><!DOCTYPE html>hi<!-- open"), "hi");
        assert_eq!(html_to_text("text <div class=\"x"), "text");
        assert_eq!(html_to_text("</p></div></>x</ weird>"), "x");
        assert_eq!(html_to_text("<textarea>a <b> c</textarea>"), "a <b> c");
    }

    #[test]
    fn plain_text_without_tags() {
        assert_eq!(html_to_text("just text"), "just text");
        assert_eq!(html_to_text("  two\nlines  \n"), "two lines");
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(html_to_text(""), "");
        assert_eq!(html_to_text("   \n "), "");
        assert_eq!(html_to_text("<p></p><div><br></div>"), "");
        assert_eq!(html_to_text("<script>x</script>"), "");
    }

    #[test]
    fn pre_pass_is_balanced_and_bounded() {
        let deep = "<div>".repeat(1000) + "x" + &"</div>".repeat(1000);
        let out = bound_nesting(&deep);
        assert_eq!(out.matches("<div>").count(), MAX_DEPTH);
        assert_eq!(out.matches("</div>").count(), MAX_DEPTH);
        // End tags with other open elements above close those first.
        assert_eq!(
            bound_nesting("<span><div></span>x"),
            "<span><div></div></span>x"
        );
        assert_eq!(bound_nesting("<p>a<p>b"), "<p>a</p><p>b");
        assert_eq!(bound_nesting("<li>a<li>b"), "<li>a</li><li>b");
        assert_eq!(bound_nesting(r#"<b id="1">x"#), "<b>x");
        assert_eq!(
            bound_nesting(r#"<ol start='3' x=1><li>a"#),
            r#"<ol start="3"><li>a"#
        );
    }

    fn timed(name: &str, html: &str) -> String {
        let started = Instant::now();
        let out = html_to_text(html);
        let elapsed = started.elapsed();
        println!(
            "{name}: {} input bytes -> {} chars in {elapsed:?}",
            html.len(),
            out.len()
        );
        assert!(elapsed < Duration::from_secs(5), "{name} took {elapsed:?}");
        out
    }

    #[test]
    fn nested_div_bomb_is_fast() {
        let mut html = String::new();
        while html.len() < 1024 * 1024 {
            html.push_str("<div>a");
        }
        let out = timed("nested div bomb (1 MiB)", &html);
        assert!(out.starts_with('a'));
    }

    #[test]
    fn other_hostile_shapes_are_fast() {
        let n = 40_000;
        let shapes = [
            ("nested ul/li", "<ul><li>x".repeat(n)),
            (
                "formatting reopen",
                (0..n).map(|k| format!("<p><b id={k}>x</p>")).collect(),
            ),
            ("span/div misnest", "<span><div>x</span>".repeat(n)),
            ("cells outside table", "<td><div>x</td>".repeat(n)),
            ("nested tables", "<table><tr><td>x".repeat(n)),
            ("nested links", "<a href=1>x".repeat(n)),
            ("mixed formatting", "<b><i><u><s><em>x".repeat(n)),
            ("self-closing divs", "<div/>x".repeat(n)),
            ("nested select", "<select><option>x".repeat(n)),
            ("svg nesting", "<svg><g>x".repeat(n)),
        ];
        for (name, html) in shapes {
            let out = timed(name, &html);
            // Inline SVG renders as its <title> only.
            assert!(out.contains('x') || name.starts_with("svg"), "{name}");
        }
    }

    /// Depth of the DOM html5ever builds (a proxy for its stack of open elements).
    fn dom_depth(html: &str) -> usize {
        let Ok(dom) = html2text::config::plain().parse_html(html.as_bytes()) else {
            return usize::MAX;
        };
        let mut max = 0;
        let mut work = vec![(dom.document.clone(), 0usize)];
        while let Some((node, d)) = work.pop() {
            max = max.max(d);
            for child in node.children.borrow().iter() {
                work.push((child.clone(), d + 1));
            }
        }
        max
    }

    /// Deterministic tag soup from a small vocabulary (a linear congruential generator).
    fn tag_soup(seed: u64, tags: usize) -> String {
        const VOCAB: &[&str] = &[
            "<div>",
            "</div>",
            "<p>",
            "</p>",
            "<b>",
            "</b>",
            "<i id=1>",
            "<i id=2>",
            "</i>",
            "<a href=x>",
            "</a>",
            "<table>",
            "</table>",
            "<tr>",
            "<td>",
            "</td>",
            "<th>",
            "<tbody>",
            "<ul>",
            "<li>",
            "</li>",
            "<ol>",
            "<dl>",
            "<dd>",
            "<dt>",
            "<span>",
            "</span>",
            "<select>",
            "<option>",
            "<svg>",
            "<math>",
            "<mi>",
            "<g>",
            "</svg>",
            "<font color=red>",
            "</font>",
            "<nobr>",
            "<button>",
            "<form>",
            "</form>",
            "<h2>",
            "<caption>",
            "<colgroup>",
            "<col>",
            "<template>",
            "<object>",
            "<marquee>",
            "<pre>",
            "<br>",
            "</br>",
            "<blockquote>",
            "<textarea>",
            "</textarea>",
            "<table><td>",
            "x",
            " y ",
            "&amp;",
            "<",
            ">",
            "<!--",
            "-->",
            "<script>",
            "</script>",
            "<div/>",
            "<b/>",
        ];
        let mut state = seed;
        let mut out = String::new();
        for _ in 0..tags {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let pick = (state >> 33) as usize % VOCAB.len();
            // Skip half of the end tags so the soup nests deeply.
            if VOCAB[pick].starts_with("</") && (state >> 20) & 1 == 0 {
                continue;
            }
            out.push_str(VOCAB[pick]);
        }
        out
    }

    #[test]
    fn parser_depth_stays_bounded() {
        let mut inputs = vec![
            "<div>".repeat(5000),
            "<ul><li>".repeat(5000),
            (0..3000).map(|k| format!("<p><b id={k}>x</p>")).collect(),
            "<span><div>x</span>".repeat(5000),
            "<td><div>x</td>".repeat(5000),
            "<table><tr><td>x".repeat(5000),
            "<table><div>".repeat(5000),
            "<a href=1>x<b>".repeat(5000),
            "<div/>".repeat(5000),
            "<select><option>x".repeat(5000),
            "<svg><g>".repeat(5000),
            "<b><p>".repeat(5000),
        ];
        for seed in 1..=20 {
            inputs.push(tag_soup(seed, 20_000));
        }
        for html in &inputs {
            let bounded = bound_nesting(html);
            let depth = dom_depth(&bounded);
            assert!(
                depth <= MAX_DEPTH + 60,
                "depth {depth} for {:?}",
                &html[..40]
            );
            let _ = html_to_text(html);
        }
    }

    #[test]
    fn huge_input_is_truncated() {
        let html = format!("<p>{}</p><p>TAIL</p>", "é".repeat(MAX_HTML_BYTES));
        let out = timed("huge paragraph", &html);
        assert!(!out.contains("TAIL"));
        assert!(out.len() <= MAX_HTML_BYTES);
        assert!(out.chars().all(|c| c == 'é'));
        assert_eq!(truncate_at_char_boundary("aé", 2), "a");
    }

    #[test]
    fn many_paragraphs_are_fast() {
        let html =
            "<p>Some normal paragraph text with <b>bold</b> &amp; entities.</p>\n".repeat(5000);
        let out = timed("paragraphs", &html);
        assert!(out.contains("bold & entities"));
    }
}
