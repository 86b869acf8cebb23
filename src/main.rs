//! The `hikyaku` command line: parses flags, sets up logging and signals,
//! runs one command and maps its result to the exit code of SPEC §9.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use hikyaku::commands::{self, Global, PreviewTarget, SendOptions, SuppressAction};
use hikyaku::error::{exit_for, Exit};
use hikyaku::store::State;
use tokio::sync::watch;

/// Bulk campaign mailer: CSV + Handlebars + SMTP, paced under the account's
/// limits, resumable without sending anyone a message twice.
#[derive(Parser)]
#[command(name = "hikyaku", version, about, next_help_heading = "Global options")]
struct Cli {
    /// State database: a file path, sqlite://PATH (default: hikyaku.db in the platform data directory).
    #[arg(long, global = true, env = "HIKYAKU_DB", value_name = "PATH|URL")]
    db: Option<String>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings, errors and the line that says how the command ended.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Colour in terminal output.
    #[arg(long, global = true, value_enum, default_value_t = Color::Auto)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Write a working example campaign (file transport) into DIR.
    Init {
        /// Folder to write into (default: the current folder).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Validate the campaign file, every row and every rendered message; send nothing.
    Check {
        /// The campaign file (TOML).
        campaign: PathBuf,
        /// Also log in to the SMTP server (EHLO, STARTTLS, AUTH; no message) to prove the credentials.
        #[arg(long)]
        connect: bool,
    },
    /// Print one rendered message, decoded for reading (--raw: its RFC 5322 source).
    Preview {
        /// The campaign file (TOML).
        campaign: PathBuf,
        /// Row number, counting from 1 without the header line (default 1).
        #[arg(long, conflicts_with = "to")]
        row: Option<u64>,
        /// The row of this address.
        #[arg(long, value_name = "EMAIL")]
        to: Option<String>,
        /// Print the RFC 5322 source as it is sent instead of the decoded message.
        #[arg(long)]
        raw: bool,
        /// Also write the HTML part to FILE, to open in a browser.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Send the campaign, or resume it where it stopped.
    Send {
        /// The campaign file (TOML).
        campaign: PathBuf,
        #[command(flatten)]
        options: SendOptions,
    },
    /// Counts per state, account usage per window, next possible send, ETA.
    Status {
        /// The campaign file (TOML).
        campaign: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every row's state as CSV, then the file's other columns.
    Export {
        /// The campaign file (TOML).
        campaign: PathBuf,
        /// Only rows in this state.
        #[arg(long, value_name = "STATE", value_parser = state_parser())]
        state: Option<State>,
        /// Write to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read the sending account's mailbox: record bounces, suppress hard bounces and unsubscribe requests.
    Bounces {
        /// The campaign file (TOML).
        campaign: PathBuf,
        /// Read messages that arrived on or after this day (YYYY-MM-DD; default: the day before the campaign started).
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// File the notifications that were processed into this folder (created if missing).
        #[arg(long, value_name = "FOLDER")]
        move_to: Option<String>,
    },
    /// Write the campaign's report: one self-contained HTML page with charts.
    Report {
        /// The campaign file (TOML).
        campaign: PathBuf,
        /// Write to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Every campaign in the state database: name, campaign file, counts per state, last activity.
    Campaigns {
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Forget one campaign's state, rehearsal included (refused while it is being sent).
    Reset {
        /// A campaign file, or a campaign name as `hikyaku campaigns` lists it.
        campaign: String,
        /// Do not ask for confirmation (needed without a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// The suppression list, shared by all campaigns.
    Suppress {
        #[command(subcommand)]
        action: Suppress,
    },
}

#[derive(Subcommand)]
enum Suppress {
    /// Add addresses.
    Add {
        /// The addresses to add.
        #[arg(required = true, value_name = "EMAIL")]
        emails: Vec<String>,
    },
    /// Remove addresses.
    Remove {
        /// The addresses to remove.
        #[arg(required = true, value_name = "EMAIL")]
        emails: Vec<String>,
    },
    /// Print the list as CSV.
    List,
    /// Add every address of a file (a CSV with an email column, or one per line).
    Import {
        /// The file to read.
        file: PathBuf,
    },
}

/// The states `export --state` accepts, listed in its help.
fn state_parser() -> impl TypedValueParser<Value = State> {
    PossibleValuesParser::new(State::ALL.map(State::as_str)).try_map(|s| s.parse::<State>())
}

/// Shown under every command's help: scripts branch on these.
const EXIT_CODES: &str = "\
Exit codes:
  0    nothing left to do (failed and unknown rows, if any, are in the summary);
       a check or --dry-run that found no problem
  1    fatal error; the state is kept and the campaign can be resumed
  2    bad usage or input; nothing sent
  75   stopped with work left (--no-wait, --limit)
  130  interrupted";

/// The command line with the exit codes under every command's help.
fn command_line() -> clap::Command {
    fn with_exit_codes(command: clap::Command) -> clap::Command {
        command
            .after_help(EXIT_CODES)
            .mut_subcommands(with_exit_codes)
    }
    with_exit_codes(Cli::command())
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command_line().get_matches()) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let stderr_tty = std::io::stderr().is_terminal();
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => stderr_tty && std::env::var_os("NO_COLOR").is_none(),
    };
    // indicatif hides bars on dumb terminals and with NO_COLOR; plain lines then.
    let term_ok = std::env::var("TERM").is_ok_and(|t| !t.is_empty() && t != "dumb");
    let progress_bar =
        stderr_tty && term_ok && std::env::var_os("NO_COLOR").is_none() && !cli.quiet;
    commands::log::init(cli.verbose, cli.quiet, color);
    let global = Global {
        db: cli.db.clone(),
        progress_bar,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Fatal.code());
        }
    };
    let result = runtime
        .block_on(run(cli.command, &global))
        .map_err(|e| global.name_database(e));
    let exit = match result {
        Ok(exit) => exit,
        // `status | head`: the reader has all it wanted; not an error.
        Err(_) if commands::output::closed() => Exit::Done,
        Err(err) => {
            tracing::error!("{err:#}");
            exit_for(&err)
        }
    };
    ExitCode::from(exit.code())
}

async fn run(command: Command, global: &Global) -> anyhow::Result<Exit> {
    match command {
        Command::Init { dir } => commands::init(&dir),
        Command::Check { campaign, connect } => commands::check(global, &campaign, connect).await,
        Command::Preview {
            campaign,
            row,
            to,
            raw,
            html,
        } => {
            let target = match to {
                Some(email) => PreviewTarget::Email(email),
                None => PreviewTarget::Row(row.unwrap_or(1)),
            };
            commands::preview(&campaign, &target, raw, html.as_deref())
        }
        Command::Send { campaign, options } => {
            commands::send(global, &campaign, &options, stop_on_signals()).await
        }
        Command::Status { campaign, json } => commands::status(global, &campaign, json).await,
        Command::Export {
            campaign,
            state,
            output,
        } => commands::export(global, &campaign, state, output.as_deref()).await,
        Command::Campaigns { json } => commands::campaigns(global, json).await,
        Command::Reset { campaign, yes } => commands::reset(global, &campaign, yes).await,
        Command::Bounces {
            campaign,
            since,
            move_to,
        } => commands::bounces(global, &campaign, since.as_deref(), move_to.as_deref()).await,
        Command::Report { campaign, output } => {
            commands::report(global, &campaign, output.as_deref()).await
        }
        Command::Suppress { action } => {
            let action = match action {
                Suppress::Add { emails } => SuppressAction::Add(emails),
                Suppress::Remove { emails } => SuppressAction::Remove(emails),
                Suppress::List => SuppressAction::List,
                Suppress::Import { file } => SuppressAction::Import(file),
            };
            commands::suppress(global, &action).await
        }
    }
}

/// The first SIGINT or SIGTERM asks the run to stop after its in-flight
/// messages; a second one ends the process at once.
fn stop_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        for round in 0..2 {
            interrupt().await;
            if round == 0 {
                tracing::warn!(
                    "stopping after the messages in flight (press Ctrl-C again to stop at once)"
                );
                let _ = tx.send(true);
            } else {
                tracing::warn!("stopped at once; messages in flight will show as unknown");
                std::process::exit(i32::from(Exit::Interrupted.code()));
            }
        }
    });
    rx
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn interrupt() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
