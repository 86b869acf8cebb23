//! How hikyaku's lines on standard error read: one scheme for every line,
//! whoever prints it — `error: …`, `warning: …`, and plain text for what a
//! command reports, as compilers and package managers print theirs.

use std::fmt;

use anstyle::{AnsiColor, Style};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The target of lines that report a command's outcome: shown with
/// `--quiet` too, which hides only the progress chatter.
pub const OUTCOME: &str = "hikyaku::outcome";

/// Logs to standard error (above the progress bar, if one is drawn) at the
/// level `-v`/`-q` ask for.
pub fn init(verbose: u8, quiet: bool, color: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // Our own crate at the chosen level; dependencies only when very verbose,
    // and never lettre's wire traces, which could carry AUTH data.
    let filter = if verbose >= 2 {
        format!("{level},lettre=info,{OUTCOME}=info")
    } else {
        format!("warn,hikyaku={level},{OUTCOME}=info")
    };
    let indicatif = tracing_indicatif::IndicatifLayer::new();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(indicatif.get_stderr_writer())
        .event_format(Lines { color });
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter))
        .with(fmt)
        .with(indicatif)
        .init();
}

/// One event, one line: its level as a lower-case word (none for info),
/// then the message. Spans, targets and times are left out: they are for
/// developers, and `-vv` shows dependencies' lines anyway.
struct Lines {
    color: bool,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = *event.metadata().level();
        if let Some((word, color)) = label(level) {
            if self.color {
                let style = Style::new().bold().fg_color(Some(color.into()));
                write!(writer, "{style}{word}{style:#}: ")?;
            } else {
                write!(writer, "{word}: ")?;
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn label(level: Level) -> Option<(&'static str, AnsiColor)> {
    match level {
        Level::ERROR => Some(("error", AnsiColor::Red)),
        Level::WARN => Some(("warning", AnsiColor::Yellow)),
        Level::INFO => None,
        Level::DEBUG => Some(("debug", AnsiColor::Blue)),
        Level::TRACE => Some(("trace", AnsiColor::Magenta)),
    }
}

/// `1 recipient`, `2 recipients`, `0 addresses`: a count with its noun in
/// the right number, for the English nouns these lines use.
pub fn plural(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        return format!("1 {noun}");
    }
    let sibilant = ["s", "x", "z", "sh", "ch"]
        .iter()
        .any(|e| noun.ends_with(e));
    let consonant_y =
        noun.ends_with('y') && !noun[..noun.len() - 1].ends_with(['a', 'e', 'i', 'o', 'u']);
    if sibilant {
        format!("{n} {noun}es")
    } else if consonant_y {
        format!("{n} {}ies", &noun[..noun.len() - 1])
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals() {
        assert_eq!(plural(1u64, "recipient"), "1 recipient");
        assert_eq!(plural(2u64, "recipient"), "2 recipients");
        assert_eq!(plural(0u64, "row"), "0 rows");
        assert_eq!(plural(3u64, "address"), "3 addresses");
        assert_eq!(plural(1u64, "address"), "1 address");
        assert_eq!(plural(2u64, "entry"), "2 entries");
        assert_eq!(plural(2u64, "day"), "2 days");
        assert_eq!(plural(5u32, "test message"), "5 test messages");
    }
}
