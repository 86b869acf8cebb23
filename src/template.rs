//! Templates (SPEC §4): the message's templates compiled once per run, in
//! strict mode, with HTML escaping only for HTML, partials from
//! `templates/partials/`, and the `default`/`upper`/`lower`/`date`/
//! `urlencode` helpers. What a template may cost is bounded (SPEC §11):
//! its size, its compile time, what its partials include and what it
//! renders to.

mod partials;

use std::path::{Path, PathBuf};

use anyhow::Result;
use handlebars::template::Template;
use handlebars::{
    no_escape, Context, Handlebars, Helper, HelperDef, HelperResult, JsonRender, Output,
    RenderContext, RenderErrorReason, ScopedJson, TemplateError,
};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};

use crate::bounded::{self, human_size, MAX_MESSAGE_BYTES};
use crate::campaign::Campaign;
use crate::error::input_error;
use partials::Partials;

/// Header values (subject, addresses, attachment paths) are short by
/// nature; one that renders longer than this is a mistake.
const MAX_INLINE_RENDERED: u64 = 64 * 1024;

/// handlebars records the line and column of every element by counting
/// from the start of the template, so compiling takes time proportional to
/// the number of expressions times the template's size: 12,500 expressions
/// in 1 MB take half a minute. This bound on that product keeps a template
/// around a second.
const MAX_COMPILE_WORK: u64 = 500_000_000;

/// The deepest HTML a text part is derived from: the HTML parser's work
/// grows with the depth of nesting at every tag, and browsers stop nesting
/// at about this depth too.
const MAX_HTML_DEPTH: usize = 512;

/// The largest HTML a text part is derived from, for each row: html2text
/// takes seconds and hundreds of megabytes per megabyte. Gmail shows only
/// the first 102 KB of an HTML part anyway.
const MAX_DERIVED_HTML_BYTES: u64 = 1024 * 1024;

/// What `urlencode` leaves as it is: RFC 3986's unreserved characters, so
/// that a value is one opaque query or path component (`+`, `&`, `'`, `@`
/// and `=` are encoded).
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const SUBJECT: &str = "[message] subject";
const FROM: &str = "[message] from";
const REPLY_TO: &str = "[message] reply_to";
const TO_NAME: &str = "[message] to_name";
const CC: &str = "[message] cc";
const BCC: &str = "[message] bcc";
const UNSUBSCRIBE: &str = "[message] list_unsubscribe";

/// Everything a recipient's message is rendered from, compiled once.
pub struct Templates {
    /// Subject, text and header templates: no escaping.
    plain: Handlebars<'static>,
    /// HTML and markdown bodies: values HTML-escaped.
    html: Handlebars<'static>,
    text_name: Option<String>,
    html_name: Option<String>,
    markdown_name: Option<String>,
    optional: Vec<&'static str>,
    header_names: Vec<(String, String)>,
    attachment_names: Vec<String>,
    /// Every template and partial file, for the content fingerprint.
    files: Vec<PathBuf>,
}

/// The rendered parts of one message, before it becomes RFC 5322.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    pub from: String,
    pub reply_to: Option<String>,
    pub to_name: Option<String>,
    pub cc: Option<String>,
    pub bcc: Option<String>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub list_unsubscribe: Option<String>,
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<String>,
}

/// Where in a template something went wrong, shown as `file:line:col`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The template file, or `[message] subject` and the like for inline ones.
    pub template: String,
    pub line: Option<usize>,
    pub col: Option<usize>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.template)?;
        if let (Some(line), Some(col)) = (self.line, self.col) {
            write!(f, ":{line}:{col}")?;
        }
        Ok(())
    }
}

/// Why a recipient's templates could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A variable that is neither a column of the file nor a built-in. It
    /// fails the same way for every row that reaches it.
    #[error("{at}: {{{{{name}}}}} is not a column of the recipients file (nor a built-in: email, campaign)")]
    MissingVariable { at: Place, name: String },
    /// Anything else handlebars refused, in its words.
    #[error("{at}: {reason}")]
    Failed { at: Place, reason: String },
    #[error("deriving the text part from HTML: {0}")]
    TextPart(String),
    #[error("{template}: renders to more than {}, the most a message may carry", human_size(*.max))]
    TooLarge { template: String, max: u64 },
}

impl RenderError {
    fn from_handlebars(err: &handlebars::RenderError) -> RenderError {
        let at = Place {
            template: err
                .template_name
                .clone()
                .unwrap_or_else(|| "template".to_string()),
            line: err.line_no,
            col: err.column_no,
        };
        match err.reason() {
            RenderErrorReason::MissingVariable(Some(name)) => RenderError::MissingVariable {
                at,
                name: name.clone(),
            },
            reason => RenderError::Failed {
                at,
                reason: reason.to_string(),
            },
        }
    }
}

/// A helper's parameter. In strict mode a variable that is missing is named,
/// as `{{name}}` alone would name it, instead of handlebars' "param with name
/// value required but not found".
fn param<'a>(
    h: &'a Helper,
    r: &Handlebars,
    index: usize,
    helper: &'static str,
) -> Result<&'a Value, handlebars::RenderError> {
    let p = h
        .param(index)
        .ok_or(RenderErrorReason::ParamNotFoundForIndex(helper, index))?;
    if r.strict_mode() && p.is_value_missing() {
        return Err(handlebars::RenderError::strict_error(p.relative_path()));
    }
    Ok(p.value())
}

/// The helpers that turn values into values: usable inline and as subexpressions.
#[derive(Clone, Copy)]
enum ValueHelper {
    Upper,
    Lower,
    /// A fallback for an empty value.
    Default,
    /// A value inside a URL: `?e={{urlencode email}}`.
    UrlEncode,
}

impl HelperDef for ValueHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, handlebars::RenderError> {
        let value = match self {
            ValueHelper::Upper => Value::String(param(h, r, 0, "upper")?.render().to_uppercase()),
            ValueHelper::Lower => Value::String(param(h, r, 0, "lower")?.render().to_lowercase()),
            ValueHelper::UrlEncode => Value::String(
                utf8_percent_encode(&param(h, r, 0, "urlencode")?.render(), URL_COMPONENT)
                    .to_string(),
            ),
            ValueHelper::Default => {
                let value = param(h, r, 0, "default")?;
                let fallback = param(h, r, 1, "default")?;
                let empty = match value {
                    Value::Null => true,
                    Value::String(s) => s.trim().is_empty(),
                    _ => false,
                };
                if empty { fallback } else { value }.clone()
            }
        };
        Ok(ScopedJson::Derived(value))
    }
}

/// `{{date}}` or `{{date "%d %B %Y"}}`: the send time, local, strftime format.
fn date_helper(
    h: &Helper,
    _: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    use std::fmt::Write;
    let format = match h.param(0) {
        None => "%Y-%m-%d",
        Some(p) => p
            .value()
            .as_str()
            .ok_or_else(|| RenderErrorReason::InvalidParamType("date format must be a string"))?,
    };
    let mut text = String::new();
    write!(text, "{}", chrono::Local::now().format(format))
        .map_err(|_| RenderErrorReason::Other(format!("invalid date format {format:?}")))?;
    out.write(&text)?;
    Ok(())
}

fn registry(escape: bool) -> Handlebars<'static> {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    if !escape {
        hb.register_escape_fn(no_escape);
    }
    hb.register_helper("upper", Box::new(ValueHelper::Upper));
    hb.register_helper("lower", Box::new(ValueHelper::Lower));
    hb.register_helper("default", Box::new(ValueHelper::Default));
    hb.register_helper("urlencode", Box::new(ValueHelper::UrlEncode));
    hb.register_helper("date", Box::new(date_helper));
    hb
}

fn template_error(err: TemplateError, shown: &str) -> anyhow::Error {
    let pos = err
        .pos()
        .map(|(line, col)| format!(":{line}:{col}"))
        .unwrap_or_default();
    input_error(format!("{shown}{pos}: {}", err.reason()))
}

/// Compiles one template, named `name` (what errors and partial lookups
/// see) and shown as `shown` in a compile error, after checking that it
/// compiles in reasonable time.
fn compile_one(source: &str, name: &str, shown: &str) -> Result<Template> {
    let expressions = source.matches("{{").count() as u64;
    let size = source.len() as u64;
    if expressions.saturating_mul(size) > MAX_COMPILE_WORK {
        return Err(input_error(format!(
            "{shown}: {expressions} {{{{…}}}} expressions in {} are more than can be compiled in \
             reasonable time (the work grows with size × expressions; at this size at most {}): \
             move parts of it into partials under templates/partials/, each compiled on its own",
            human_size(size),
            MAX_COMPILE_WORK / size.max(1)
        )));
    }
    Template::compile_with_name(source, name.to_string()).map_err(|e| template_error(e, shown))
}

impl Templates {
    /// Compiles every template of the campaign. Syntax errors are input
    /// errors with file, line and column; so are partials that include each
    /// other in a loop, and templates that their partials grow past the
    /// size of a message.
    pub fn compile(campaign: &Campaign) -> Result<Templates> {
        let mut plain = registry(false);
        let mut html = registry(true);
        let mut files = Vec::new();
        let display = |p: &Path| p.display().to_string();

        let partials_dir = campaign.dir.join("templates").join("partials");
        let mut partials: Vec<(String, Template)> = Vec::new();
        if partials_dir.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&partials_dir)
                .map_err(|e| input_error(format!("cannot read {}: {e}", partials_dir.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "hbs"))
                .collect();
            entries.sort();
            for path in entries {
                let stem = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| n.trim_end_matches(".hbs"))
                    .map(|n| n.split('.').next().unwrap_or(n).to_string())
                    .unwrap_or_default();
                let source = read_template(&path)?;
                let template = compile_one(&source, &stem, &display(&path))?;
                for hb in [&mut plain, &mut html] {
                    hb.register_template(&stem, template.clone());
                }
                partials.push((stem, template));
                files.push(path);
            }
        }

        let mut bodies: Vec<(String, Template)> = Vec::new();
        let mut file_template =
            |hb: &mut Handlebars<'static>, rel: &Option<PathBuf>| -> Result<Option<String>> {
                let Some(rel) = rel else { return Ok(None) };
                let path = campaign.dir.join(rel);
                let source = read_template(&path)?;
                let name = display(&path);
                let template = compile_one(&source, &name, &name)?;
                hb.register_template(&name, template.clone());
                bodies.push((name.clone(), template));
                files.push(path);
                Ok(Some(name))
            };
        let m = &campaign.message;
        let text_name = file_template(&mut plain, &m.text)?;
        let html_name = file_template(&mut html, &m.html)?;
        let markdown_name = file_template(&mut html, &m.markdown)?;

        let shown = |key: &str| format!("{} {key}", campaign.path.display());
        let mut inline = |name: &str, source: &str| -> Result<()> {
            let template = compile_one(source, name, &shown(name))?;
            plain.register_template(name, template.clone());
            bodies.push((shown(name), template));
            Ok(())
        };
        inline(SUBJECT, &m.subject)?;
        inline(FROM, &m.from)?;
        let mut optional = Vec::new();
        for (name, value) in [
            (REPLY_TO, &m.reply_to),
            (TO_NAME, &m.to_name),
            (CC, &m.cc),
            (BCC, &m.bcc),
            (UNSUBSCRIBE, &m.list_unsubscribe),
        ] {
            if let Some(source) = value {
                inline(name, source)?;
                optional.push(name);
            }
        }
        let mut header_names = Vec::new();
        for (header, source) in &m.headers {
            let name = format!("[message] headers.{header}");
            inline(&name, source)?;
            header_names.push((header.clone(), name));
        }
        let mut attachment_names = Vec::new();
        for (i, source) in m.attachments.iter().enumerate() {
            let name = format!("[message] attachments[{i}]");
            inline(&name, source)?;
            attachment_names.push(name);
        }

        let graph = Partials::new(
            partials.iter().map(|(name, t)| (name.as_str(), t)),
            bodies.iter().map(|(_, t)| t),
        )
        .map_err(|e| input_error(format!("{}: {e}", partials_dir.display())))?;
        for (shown, template) in &bodies {
            graph
                .check(template, MAX_MESSAGE_BYTES)
                .map_err(|e| input_error(format!("{shown}: {e}")))?;
        }
        Ok(Templates {
            plain,
            html,
            text_name,
            html_name,
            markdown_name,
            optional,
            header_names,
            attachment_names,
            files,
        })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Renders every part for one recipient. `data` holds the row's columns
    /// plus `email` and `campaign`. Errors read `file:line:col: reason`.
    pub fn render(&self, data: Map<String, Value>) -> std::result::Result<Rendered, RenderError> {
        // Taken as it is: wrapping a reference would copy every value.
        let ctx = Context::from(Value::Object(data));
        let plain = |name: &str| render_capped(&self.plain, name, &ctx, MAX_INLINE_RENDERED);
        let mut r = Rendered {
            from: plain(FROM)?,
            subject: plain(SUBJECT)?,
            ..Rendered::default()
        };
        for name in &self.optional {
            let value = Some(plain(name)?).filter(|v| !v.trim().is_empty());
            match *name {
                REPLY_TO => r.reply_to = value,
                TO_NAME => r.to_name = value,
                CC => r.cc = value,
                BCC => r.bcc = value,
                _ => r.list_unsubscribe = value,
            }
        }
        for (header, name) in &self.header_names {
            r.headers.push((header.clone(), plain(name)?));
        }
        for name in &self.attachment_names {
            r.attachments.push(plain(name)?);
        }
        if let Some(name) = &self.text_name {
            r.text = Some(render_capped(&self.plain, name, &ctx, MAX_MESSAGE_BYTES)?);
        }
        let html = |name: &str| render_capped(&self.html, name, &ctx, MAX_MESSAGE_BYTES);
        if let Some(name) = &self.html_name {
            r.html = Some(html(name)?);
        }
        if let Some(name) = &self.markdown_name {
            let source = html(name)?;
            let mut out = String::with_capacity(source.len() * 3 / 2);
            pulldown_cmark::html::push_html(&mut out, pulldown_cmark::Parser::new(&source));
            r.html = Some(out);
        }
        if r.text.is_none() {
            if let Some(html) = &r.html {
                r.text = Some(text_part(html)?);
            }
        }
        Ok(r)
    }
}

/// Output that refuses to grow past `max` bytes: a template that repeats a
/// large value stops there instead of filling memory.
struct Capped {
    bytes: Vec<u8>,
    max: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.max {
            self.over = true;
            return Err(std::io::Error::other("the rendered text is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn render_capped(
    hb: &Handlebars<'static>,
    name: &str,
    ctx: &Context,
    max: u64,
) -> std::result::Result<String, RenderError> {
    let mut out = Capped {
        bytes: Vec::new(),
        max: usize::try_from(max).unwrap_or(usize::MAX),
        over: false,
    };
    match hb.render_with_context_to_write(name, ctx, &mut out) {
        Err(_) if out.over => Err(RenderError::TooLarge {
            template: name.to_string(),
            max,
        }),
        Err(e) => Err(RenderError::from_handlebars(&e)),
        // Every write is a whole `&str`, so the bytes are UTF-8.
        Ok(()) => String::from_utf8(out.bytes).map_err(|e| RenderError::Failed {
            at: Place {
                template: name.to_string(),
                line: None,
                col: None,
            },
            reason: e.to_string(),
        }),
    }
}

/// The text part derived from an HTML part, refused for HTML so large or
/// nested so deep that deriving it would take minutes.
fn text_part(html: &str) -> std::result::Result<String, RenderError> {
    if html.len() as u64 > MAX_DERIVED_HTML_BYTES {
        return Err(RenderError::TextPart(format!(
            "the HTML is {}; a text part is derived only from HTML of at most {} (Gmail shows \
             only the first 102 KB): give a `text` template",
            human_size(html.len() as u64),
            human_size(MAX_DERIVED_HTML_BYTES)
        )));
    }
    let depth = html_depth(html);
    if depth > MAX_HTML_DEPTH {
        return Err(RenderError::TextPart(format!(
            "the HTML nests elements {depth} deep; a text part is derived only from HTML nested at \
             most {MAX_HTML_DEPTH} deep: flatten it, or give a `text` template"
        )));
    }
    html2text::from_read(html.as_bytes(), 78).map_err(|e| RenderError::TextPart(e.to_string()))
}

/// Elements that never hold others, or whose end tag may be left out so
/// that the next one closes them: neither makes HTML deeper.
const FLAT_ELEMENTS: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
    "track", "wbr", "p", "li", "dt", "dd", "option", "optgroup", "tr", "td", "th", "thead",
    "tbody", "tfoot", "rb", "rt", "rp", "colgroup", "caption", "html", "head", "body",
];

/// How deep the elements of `html` nest, counted in one pass over the
/// tags: start tags of elements that hold others open one level, end tags
/// close one. An approximation of what a parser builds, on the high side.
fn html_depth(html: &str) -> usize {
    let bytes = html.as_bytes();
    let (mut depth, mut deepest, mut at) = (0usize, 0usize, 0usize);
    while let Some(offset) = bytes[at..].iter().position(|&b| b == b'<') {
        at += offset + 1;
        let rest = &html[at..];
        if rest.starts_with("!--") {
            at += rest.find("-->").map_or(rest.len(), |end| end + 3);
            continue;
        }
        if rest.starts_with('/') {
            depth = depth.saturating_sub(1);
            continue;
        }
        let name_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-')
            .count();
        if name_len == 0 || !rest.as_bytes()[0].is_ascii_alphabetic() {
            continue;
        }
        let name = rest[..name_len].to_ascii_lowercase();
        let end = rest.find('>').unwrap_or(rest.len());
        let self_closing = rest[..end].ends_with('/');
        if !self_closing && !FLAT_ELEMENTS.contains(&name.as_str()) {
            depth += 1;
            deepest = deepest.max(depth);
        }
        at += end;
    }
    deepest
}

/// Reads a template file: a regular file no larger than a message.
fn read_template(path: &Path) -> Result<String> {
    bounded::read_to_string(path, MAX_MESSAGE_BYTES)
        .map_err(|e| input_error(format!("cannot read template {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign(dir: &Path, message: &str, files: &[(&str, &str)]) -> Result<Campaign> {
        for (name, body) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let path = dir.join("campaign.toml");
        std::fs::write(
            &path,
            format!("name = \"t\"\n[recipients]\nfile = \"r.csv\"\n[message]\nfrom = \"a@example.com\"\n{message}\n[transport]\nkind = \"file\"\n"),
        )
        .unwrap();
        Campaign::load(&path)
    }

    fn data(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    }

    #[test]
    fn html_escapes_values_text_and_subject_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(
            dir.path(),
            "subject = \"Hi {{name}}\"\ntext = \"t.hbs\"\nhtml = \"h.hbs\"",
            &[
                ("t.hbs", "Dear {{name}}"),
                ("h.hbs", "<p>Dear {{name}}</p>"),
            ],
        )
        .unwrap();
        let t = Templates::compile(&c).unwrap();
        let r = t.render(data(&[("name", "Tom & <Jerry>")])).unwrap();
        assert_eq!(r.subject, "Hi Tom & <Jerry>");
        assert_eq!(r.text.as_deref(), Some("Dear Tom & <Jerry>"));
        assert_eq!(
            r.html.as_deref(),
            Some("<p>Dear Tom &amp; &lt;Jerry&gt;</p>")
        );
    }

    #[test]
    fn unknown_variable_is_reported_with_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(
            dir.path(),
            "subject = \"Hi\"\ntext = \"t.hbs\"",
            &[("t.hbs", "Hello {{name}},\n\nyour code: {{coupon}}\n")],
        )
        .unwrap();
        let t = Templates::compile(&c).unwrap();
        let err = t.render(data(&[("name", "")])).unwrap_err();
        let RenderError::MissingVariable { at, name } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(name, "coupon");
        assert!(at.to_string().ends_with("t.hbs:3:12"), "{err}");
        assert!(
            err.to_string().contains("{{coupon}} is not a column"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_file_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(
            dir.path(),
            "subject = \"Hi\"\ntext = \"t.hbs\"",
            &[("t.hbs", "ok\n{{#if x}}\nno close\n")],
        )
        .unwrap();
        let err = Templates::compile(&c).err().unwrap().to_string();
        assert!(err.contains("t.hbs:"), "{err}");
    }

    #[test]
    fn helpers_and_partial_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(
            dir.path(),
            "subject = \"{{upper name}} {{lower name}} {{default nick 'friend'}}\"\nhtml = \"h.hbs\"",
            &[
                ("h.hbs", "{{#> layout}}<b>{{name}}</b>{{/layout}}"),
                ("templates/partials/layout.hbs", "<html>{{> @partial-block}}</html>"),
            ],
        )
        .unwrap();
        let t = Templates::compile(&c).unwrap();
        let r = t.render(data(&[("name", "Ann"), ("nick", "")])).unwrap();
        assert_eq!(r.subject, "ANN ann friend");
        assert_eq!(r.html.as_deref(), Some("<html><b>Ann</b></html>"));
        let text = r.text.unwrap();
        assert!(text.contains("Ann"), "derived text part: {text:?}");
        assert_eq!(t.files().len(), 2);
    }

    #[test]
    fn date_helper_formats_the_send_time() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(
            dir.path(),
            "subject = \"{{date '%Y'}}\"\ntext = \"t.hbs\"",
            &[("t.hbs", "x")],
        )
        .unwrap();
        let r = Templates::compile(&c).unwrap().render(data(&[])).unwrap();
        assert_eq!(r.subject, chrono::Local::now().format("%Y").to_string());
    }

    #[test]
    fn markdown_gives_both_parts() {
        let dir = tempfile::tempdir().unwrap();
        let c = campaign(
            dir.path(),
            "subject = \"s\"\nmarkdown = \"m.hbs\"",
            &[("m.hbs", "# Hello {{name}}\n\n*news*\n")],
        )
        .unwrap();
        let r = Templates::compile(&c)
            .unwrap()
            .render(data(&[("name", "A<b>")]))
            .unwrap();
        let html = r.html.unwrap();
        assert!(html.contains("<h1>Hello A&lt;b&gt;</h1>"), "{html}");
        assert!(html.contains("<em>news</em>"), "{html}");
        assert!(r.text.unwrap().contains("Hello A<b>"));
    }
}
