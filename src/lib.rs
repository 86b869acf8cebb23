//! hikyaku: a bulk campaign mailer. CSV rows rendered through Handlebars,
//! sent through SMTP under the account's limits, every recipient's state
//! kept in SQLite so that an interrupted campaign resumes without sending
//! anyone a message twice.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod bounces;
pub mod bounded;
pub mod campaign;
pub mod commands;
pub mod csv_lines;
pub mod domains;
pub mod engine;
pub mod error;
pub mod limits;
pub mod message;
pub mod personalize;
pub mod recipients;
pub mod reply;
pub mod report;
pub mod schedule;
pub mod store;
pub mod template;
pub mod time;
pub mod transport;
