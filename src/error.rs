//! Errors that decide the exit code, so that `main` maps one result to one
//! number (SPEC §9) instead of each command exiting on its own.

use std::fmt;

/// How a run ended, as the process exit code the user and scripts see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Nothing left to do (failures, if any, are in the summary).
    Done,
    /// Fatal error; the state is kept and the campaign resumable.
    Fatal,
    /// Bad usage or input; nothing was sent.
    Usage,
    /// Stopped with work left (`--no-wait`, `--limit`).
    WorkLeft,
    /// Interrupted by SIGINT / SIGTERM.
    Interrupted,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Done => 0,
            Exit::Fatal => 1,
            Exit::Usage => 2,
            Exit::WorkLeft => 75,
            Exit::Interrupted => 130,
        }
    }
}

/// A problem with what the user gave us (campaign file, CSV, templates,
/// command line). Anywhere in an `anyhow` chain it makes the exit code 2.
#[derive(Debug)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Shorthand for returning an [`InputError`] through `anyhow`.
pub fn input_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(msg.into()))
}

/// The exit code for an error that ended a command.
pub fn exit_for(err: &anyhow::Error) -> Exit {
    if err.chain().any(|e| e.is::<InputError>()) {
        Exit::Usage
    } else {
        Exit::Fatal
    }
}

/// At most this many characters of a value are quoted in a message: a line
/// of 200 KB or a pasted file helps nobody and floods the terminal.
pub const QUOTE_MAX: usize = 200;

/// A value for an error message: quoted, cut after [`QUOTE_MAX`]
/// characters with an ellipsis.
pub fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTE_MAX) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}…", &value[..cut]),
    }
}

/// A text for an error message, cut after [`QUOTE_MAX`] characters with an
/// ellipsis.
pub fn excerpt(text: &str) -> std::borrow::Cow<'_, str> {
    cut(text, QUOTE_MAX)
}

/// `text` cut after `max` characters with an ellipsis.
pub fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => text.into(),
        Some((at, _)) => format!("{}…", &text[..at]).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_cut_with_an_ellipsis() {
        assert_eq!(quote("abc"), "\"abc\"");
        let long = "é".repeat(QUOTE_MAX + 50);
        let q = quote(&long);
        assert_eq!(q.chars().count(), QUOTE_MAX + 3, "{q}");
        assert!(q.ends_with("\"…"), "{q}");
        assert_eq!(excerpt(&long).chars().count(), QUOTE_MAX + 1);
        assert_eq!(excerpt("short"), "short");
    }
}
