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
