//! HTML ticket bodies (Pylon `body_html`, `message_html`) to tidy plain text.
//!
//! The input is tokenised by html5ever's tokenizer (the WHATWG tokenizer: character references,
//! comments, doctypes, malformed tags and raw-text elements handled as browsers handle them) and
//! a small sink turns the token stream into text: inline text flows with HTML whitespace
//! collapsed, block elements start new lines, paragraphs and headings are separated by a blank
//! line, `script`/`style`/`title` and similar are dropped with their content.
//!
//! No tree is built. A document tree is what a renderer needs for layout; building one costs
//! most of a conversion's time and is quadratic in nesting depth (html5ever's tree builder
//! searches its stack of open elements per tag), so hostile nesting would need a depth cap. The
//! tokenizer alone is linear in the input, so hostile nesting costs nothing special, and plain
//! text needs only the block/inline distinction.

use std::cell::RefCell;

use html5ever::tendril::StrTendril;
use html5ever::tokenizer::states::RawKind;
use html5ever::tokenizer::{
    BufferQueue, Tag, TagKind, Token, TokenSink, TokenSinkResult, Tokenizer, TokenizerOpts,
};

/// Max input bytes converted; longer input is cut at a char boundary first.
pub const MAX_HTML_BYTES: usize = 256 * 1024;

/// Leading whitespace kept per output line (preformatted text can indent deeply).
const MAX_INDENT: usize = 16;

/// HTML (a ticket body) to tidy plain text.
///
/// Entities are decoded once, U+00A0 becomes a space, `<br>` is a line break, block elements
/// (`div`, `li`, table cells, …) start a new line, `<p>` and headings are separated by a blank
/// line, `<img>` contributes its `alt` text, `<pre>`/`<textarea>` keep their whitespace,
/// `script`/`style`/`title`/`template` (and similar) are dropped with their content, trailing
/// spaces are trimmed per line, runs of blank lines collapse to one and the result is trimmed.
///
/// Bounded: the input is cut to [`MAX_HTML_BYTES`] and converted in one linear pass.
/// Never panics; returns `""` for input with no text.
pub fn html_to_text(html: &str) -> String {
    let input = truncate_at_char_boundary(html, MAX_HTML_BYTES);
    if input.trim().is_empty() {
        return String::new();
    }
    std::panic::catch_unwind(|| tidy(&convert(input))).unwrap_or_default()
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

/// Runs the tokenizer over `input` with a [`TextSink`] and returns the raw text.
fn convert(input: &str) -> String {
    let queue = BufferQueue::default();
    queue.push_back(StrTendril::from_slice(input));
    let tokenizer = Tokenizer::new(
        TextSink(RefCell::new(Text::with_capacity(input.len()))),
        TokenizerOpts::default(),
    );
    // The sink never asks the tokenizer to pause (no scripts), so one feed consumes everything.
    let _ = tokenizer.feed(&queue);
    tokenizer.end();
    tokenizer.sink.0.into_inner().out
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
// The token sink.
// ---------------------------------------------------------------------------------------------

/// How an element shapes the text around it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Flows with the text around it (`b`, `a`, `span`, unknown elements).
    Inline,
    /// Starts and ends on a line of its own (`div`, `li`, `td`, …).
    Block,
    /// Separated from its neighbours by a blank line (`p`, headings, `pre`, `blockquote`).
    Paragraph,
}

fn kind(name: &str) -> Kind {
    match name {
        "p" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "pre" | "listing" | "plaintext"
        | "blockquote" => Kind::Paragraph,
        "div" | "ul" | "ol" | "dl" | "li" | "dt" | "dd" | "table" | "tr" | "td" | "th"
        | "caption" | "thead" | "tbody" | "hr" | "figure" | "fieldset" | "tfoot" | "address"
        | "article" | "aside" | "center" | "details" | "dialog" | "dir" | "figcaption"
        | "footer" | "form" | "header" | "hgroup" | "legend" | "main" | "menu" | "nav"
        | "search" | "section" | "summary" | "option" | "optgroup" | "select" | "textarea"
        | "body" | "html" | "frameset" | "frame" => Kind::Block,
        _ => Kind::Inline,
    }
}

/// Elements dropped with their content (never text a reader sees).
fn is_dropped(name: &str) -> bool {
    matches!(
        name,
        "script" | "style" | "title" | "iframe" | "noembed" | "noframes" | "template"
    )
}

/// The tokenizer state an element's content is read in, when it is not ordinary markup (the
/// tree builder tells the tokenizer this; without one, the sink must).
fn raw_state(name: &str) -> Option<RawKind> {
    match name {
        "script" => Some(RawKind::ScriptData),
        "style" | "iframe" | "noembed" | "noframes" | "xmp" => Some(RawKind::Rawtext),
        "title" | "textarea" => Some(RawKind::Rcdata),
        _ => None,
    }
}

/// The text built so far.
struct Text {
    out: String,
    /// Line breaks owed before the next text (the largest one asked for since the last text).
    owed: usize,
    /// A collapsed run of whitespace is owed before the next text on the same line.
    space: bool,
    /// Open elements whose whitespace is kept (`pre`, `textarea`, …).
    pre: usize,
    /// The first newline right after `<pre>`/`<textarea>` is not content (as in browsers).
    skip_newline: bool,
    /// Inside an element dropped with its content: its name and how deep it nests in itself.
    dropping: Option<(String, usize)>,
}

impl Text {
    fn with_capacity(n: usize) -> Text {
        Text {
            out: String::with_capacity(n),
            owed: 0,
            space: false,
            pre: 0,
            skip_newline: false,
            dropping: None,
        }
    }

    /// Asks for `n` line breaks before the next text (1: new line, 2: blank line).
    fn breaks(&mut self, n: usize) {
        self.owed = self.owed.max(n);
        self.space = false;
    }

    /// A `<br>`: one more line break, even right after another.
    fn hard_break(&mut self) {
        if self.owed > 0 {
            self.flush_breaks();
        }
        self.out.push('\n');
        self.space = false;
    }

    fn flush_breaks(&mut self) {
        if !self.out.is_empty() {
            let have = self.out.len() - self.out.trim_end_matches('\n').len();
            for _ in have..self.owed {
                self.out.push('\n');
            }
        }
        self.owed = 0;
    }

    fn at_line_start(&self) -> bool {
        self.out.is_empty() || self.out.ends_with('\n')
    }

    /// Text in normal flow: runs of HTML whitespace become one space, none at a line start.
    fn flow(&mut self, s: &str) {
        for (i, piece) in s.split(is_html_space).enumerate() {
            // Every piece after the first follows a whitespace character.
            if i > 0 {
                self.space = true;
            }
            if piece.is_empty() {
                continue;
            }
            if self.owed > 0 {
                self.flush_breaks();
                self.space = false;
            }
            if self.space && !self.at_line_start() {
                self.out.push(' ');
            }
            self.out.push_str(piece);
            self.space = false;
        }
    }

    /// Preformatted text: kept as is.
    fn verbatim(&mut self, mut s: &str) {
        if std::mem::take(&mut self.skip_newline) {
            s = s.strip_prefix('\n').unwrap_or(s);
        }
        if s.is_empty() {
            return;
        }
        if self.owed > 0 {
            self.flush_breaks();
        } else if self.space && !self.at_line_start() {
            self.out.push(' ');
        }
        self.space = false;
        self.out.push_str(s);
    }

    fn text(&mut self, s: &str) {
        if self.dropping.is_some() {
            return;
        }
        if self.pre > 0 {
            self.verbatim(s);
        } else {
            self.skip_newline = false;
            self.flow(s);
        }
    }

    /// Handles a tag; returns the tokenizer state its content must be read in, if special.
    fn tag(&mut self, tag: &Tag) -> Option<RawKind> {
        let name: &str = &tag.name;
        let start = tag.kind == TagKind::StartTag;
        if let Some((open, depth)) = &mut self.dropping {
            // Raw-text content inside a dropped element must still be read as raw text.
            let state = if start { raw_state(name) } else { None };
            if open.as_str() == name {
                if start {
                    *depth += 1;
                } else {
                    *depth -= 1;
                    if *depth == 0 {
                        self.dropping = None;
                    }
                }
            }
            return state;
        }
        if start {
            self.start_tag(tag, name)
        } else {
            self.end_tag(name);
            None
        }
    }

    fn start_tag(&mut self, tag: &Tag, name: &str) -> Option<RawKind> {
        self.skip_newline = false;
        if is_dropped(name) {
            // A self-closing flag on these is ignored in HTML: the element is open.
            self.dropping = Some((name.to_string(), 1));
            return raw_state(name);
        }
        match name {
            "br" => self.hard_break(),
            "img" => {
                if let Some(alt) = tag.attrs.iter().find(|a| &*a.name.local == "alt") {
                    self.flow(&alt.value);
                }
            }
            "pre" | "listing" | "textarea" | "xmp" | "plaintext" => {
                // A self-closing flag is ignored here too (`<pre/>` opens a `pre`).
                self.breaks(if kind(name) == Kind::Paragraph { 2 } else { 1 });
                self.pre += 1;
                self.skip_newline = matches!(name, "pre" | "listing" | "textarea");
                return raw_state(name);
            }
            _ => self.open_or_close(name),
        }
        None
    }

    fn end_tag(&mut self, name: &str) {
        match name {
            // Browsers read `</br>` as `<br>`.
            "br" => self.hard_break(),
            "pre" | "listing" | "textarea" | "xmp" => {
                self.pre = self.pre.saturating_sub(1);
                self.skip_newline = false;
                self.open_or_close(name);
            }
            _ => self.open_or_close(name),
        }
    }

    /// The line breaks a block starts or ends with.
    fn open_or_close(&mut self, name: &str) {
        match kind(name) {
            Kind::Inline => {}
            Kind::Block => self.breaks(1),
            Kind::Paragraph => self.breaks(2),
        }
    }
}

fn is_html_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ')
}

/// The tokenizer's sink (the tokenizer hands tokens over through `&self`).
struct TextSink(RefCell<Text>);

impl TokenSink for TextSink {
    type Handle = ();

    fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
        let mut text = self.0.borrow_mut();
        match token {
            Token::CharacterTokens(s) => text.text(&s),
            Token::TagToken(tag) => {
                let raw = text.tag(&tag);
                if tag.kind == TagKind::StartTag {
                    if &*tag.name == "plaintext" {
                        return TokenSinkResult::Plaintext;
                    }
                    if let Some(kind) = raw {
                        return TokenSinkResult::RawData(kind);
                    }
                }
            }
            // Comments, doctypes, NUL characters, parse errors and the end of input add no text.
            _ => {}
        }
        TokenSinkResult::Continue
    }
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
            assert!(out.contains('x'), "{name}");
        }
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
    fn tag_soup_converts_quickly_and_never_panics() {
        let mut inputs = vec![
            "<div>".repeat(50_000),
            "<table><div>".repeat(20_000),
            "<a href=1>x<b>".repeat(20_000),
            "<b><p>".repeat(20_000),
        ];
        for seed in 1..=20 {
            inputs.push(tag_soup(seed, 20_000));
        }
        for (k, html) in inputs.iter().enumerate() {
            let out = timed(&format!("soup {k}"), html);
            assert!(out.len() <= html.len(), "soup {k}");
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

    #[test]
    fn inline_elements_flow_and_whitespace_collapses() {
        assert_eq!(html_to_text("a<b>b</b>c"), "abc");
        assert_eq!(html_to_text("<b>one</b>\n  <i>two</i>"), "one two");
        assert_eq!(html_to_text("<p>\n  spaced\t out  </p>"), "spaced out");
        assert_eq!(html_to_text("<span>a</span><div> b </div>c"), "a\nb\nc");
    }

    #[test]
    fn legacy_entities_without_semicolons() {
        assert_eq!(
            html_to_text("AT&amp T &copy 2026 &bogus; &notit;"),
            // As in browsers: a legacy name is a prefix match in text (`&not` + `it;`).
            "AT& T © 2026 &bogus; ¬it;"
        );
    }

    #[test]
    fn preformatted_text_keeps_its_whitespace() {
        assert_eq!(
            html_to_text("<p>log:</p><pre>\nline  1\n    line 2\n</pre><p>end</p>"),
            "log:\n\nline  1\n    line 2\n\nend"
        );
        // As in browsers, a self-closing flag does not close a `pre`.
        assert_eq!(html_to_text("<pre/>a  b</pre>c"), "a  b\n\nc");
    }

    #[test]
    fn raw_text_is_not_markup() {
        // A `</div>` inside a script is script text, not a tag.
        assert_eq!(
            html_to_text("<script>if(a</div>b){}</script>after"),
            "after"
        );
        assert_eq!(html_to_text("<style>p:before{content:'<b>'}</style>x"), "x");
        assert_eq!(html_to_text("<title>Ticket <b>42</b></title>body"), "body");
        assert_eq!(html_to_text("<xmp><b>shown</b></xmp>"), "<b>shown</b>");
        assert_eq!(
            html_to_text("<template><p>hidden<template>deeper</template>still</p></template>seen"),
            "seen"
        );
        assert_eq!(
            html_to_text("<template><script>'</template>'</script></template>ok"),
            "ok"
        );
    }

    #[test]
    fn an_unclosed_head_does_not_hide_the_body() {
        assert_eq!(
            html_to_text("<html><head><meta charset=utf-8><title>t</title><p>Hello</p>"),
            "Hello"
        );
    }

    #[test]
    fn a_realistic_ticket() {
        let html = "<div dir=\"ltr\">Hi team,<br><br>Exporting to CSV fails with \
                    <code>ERR_TIMEOUT</code> since Monday.<div><br></div>\
                    <div>Steps:</div><ol><li>Open <a href=\"https://x.test\">Reports</a></li>\
                    <li>Click&nbsp;<b>Export</b></li></ol>\
                    <blockquote>Sent from my phone</blockquote></div>";
        assert_eq!(
            html_to_text(html),
            "Hi team,\n\nExporting to CSV fails with ERR_TIMEOUT since Monday.\n\nSteps:\n\
             Open Reports\nClick Export\n\nSent from my phone"
        );
    }
}
