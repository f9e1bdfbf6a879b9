//! emberd's log: `tracing` to stderr, as text or as JSON lines.
//!
//! Text is for people (`journalctl -u emberd`, a terminal): one line per
//! event, the context in front (`invoke{function=echo invocation=…}`).
//! When stderr is systemd's journal (`JOURNAL_STREAM` names it), each line
//! starts with its syslog priority (`<4>` for a warning), which the journal
//! takes as the entry's priority and strips, and the timestamp is left to
//! the journal. JSON is for log pipelines: one flat object per line —
//! `timestamp`, `level`, `target`, `message`, and every field of the event
//! and of the spans it happened in (`function`, `version`, `instance`,
//! `invocation`, `vmm`, `pid`, …) at the top level, so
//! `jq 'select(.instance == "…")'` finds all there is about an instance,
//! its ember-vmm's own lines included.
//!
//! Lines are written by a thread of their own through a bounded queue
//! (tracing-appender, lossy): a stalled journal never blocks emberd, nor —
//! through the VMM log thread — the VMMs; what does not fit is dropped.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::Level;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line, context fields at the top level.
    Json,
}

/// Lines queued for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 64 * 1024;

/// Keeps the writer thread; dropping it writes out what is queued. Drop it
/// before `std::process::exit`, which runs no destructors.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Installs the global subscriber: `filter` (e.g. from `EMBER_LOG`), in
/// `format`, to stderr through the writer thread.
pub fn init(format: LogFormat, filter: EnvFilter) -> LogGuard {
    let journal = stderr_is_journal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("ember_log")
        .finish(std::io::stderr());
    match (format, journal) {
        (LogFormat::Text, false) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        // The journal keeps its own time.
        (LogFormat::Text, true) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .event_format(Prioritized {
                journal: true,
                inner: tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            })
            .init(),
        (LogFormat::Json, journal) => json_subscriber(filter, writer, journal).init(),
    }
    guard
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` (`dev:inode`)
/// names the stream systemd connected, and is inherited by everything
/// started from it, so it counts only if stderr is that very socket.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) fills the stat buffer we own for a descriptor we hold.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let stat = unsafe { stat.assume_init() };
    stat.st_dev == dev && stat.st_ino == ino
}

/// A line format, behind the syslog priority of its event (`<3>` error,
/// `<4>` warning, `<6>` info, `<7>` debug) when the line goes to the journal.
struct Prioritized<F> {
    journal: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{priority}>")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// A subscriber writing flat JSON lines to `writer`, each behind its
/// priority when `journal`.
pub fn json_subscriber<W>(
    filter: EnvFilter,
    writer: W,
    journal: bool,
) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .fmt_fields(JsonFields::new())
        .event_format(Prioritized {
            journal,
            inner: FlatJson,
        })
        .finish()
}

/// The JSON line format: the event's fields and its spans' fields merged
/// into one object (an event's own field wins over a span's of the same
/// name; an inner span's over an outer one's).
struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut FieldsInto(&mut line));
        // Last, so that no field can take their names.
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        let meta = event.metadata();
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Records an event's fields into a JSON object.
struct FieldsInto<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsInto<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    fn lines(buffer: &Buffer) -> Vec<Value> {
        String::from_utf8(buffer.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    #[test]
    fn json_lines_carry_the_span_fields_at_the_top_level() {
        let buffer = Buffer::default();
        let subscriber = json_subscriber(EnvFilter::new("debug"), buffer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "invoke",
                function = "echo",
                invocation = "00ff",
                instance = tracing::field::Empty,
                version = tracing::field::Empty,
            );
            let _in = span.enter();
            tracing::info!("routed");
            span.record("instance", "echo-ab12-1");
            span.record("version", 3u64);
            tracing::warn!(kind = "timeout", "function error \"quoted\"\nnext");
            tracing::info!(target: "ember_vmm", vmm = "p3", pid = 42u64, "from the VMM");
        });
        let lines = lines(&buffer);
        assert_eq!(lines.len(), 3, "{lines:?}");
        for line in &lines {
            assert_eq!(line["function"], "echo", "{line}");
            assert_eq!(line["invocation"], "00ff", "{line}");
            assert!(line["timestamp"].as_str().is_some_and(|t| t.contains('T')));
        }
        assert_eq!(lines[0]["message"], "routed");
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0].get("instance").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["instance"], "echo-ab12-1");
        assert_eq!(lines[1]["version"], 3);
        assert_eq!(lines[1]["kind"], "timeout");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["message"], "function error \"quoted\"\nnext");
        assert_eq!(lines[2]["target"], "ember_vmm");
        assert_eq!(
            (&lines[2]["vmm"], &lines[2]["pid"]),
            (&"p3".into(), &42.into())
        );
    }

    #[test]
    fn journal_lines_start_with_their_priority() {
        let buffer = Buffer::default();
        let subscriber = json_subscriber(EnvFilter::new("debug"), buffer.clone(), true);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let priorities: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(priorities, ["<3>", "<4>", "<6>", "<7>"]);
        for line in text.lines() {
            let value: Value = serde_json::from_str(&line[3..]).unwrap();
            assert!(value["message"].is_string());
        }
    }

    #[test]
    fn journal_stream_counts_only_when_it_names_stderr() {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat(2) into a buffer we own.
        assert_eq!(unsafe { libc::fstat(2, stat.as_mut_ptr()) }, 0);
        // SAFETY: fstat succeeded.
        let stat = unsafe { stat.assume_init() };
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", stat.st_dev, stat.st_ino));
        assert!(stderr_is_journal());
        // Whatever stderr is here, it is not a made-up inode.
        std::env::set_var("JOURNAL_STREAM", "1:1");
        assert!(!stderr_is_journal());
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!stderr_is_journal());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!stderr_is_journal());
    }

    #[test]
    fn the_filter_applies() {
        let buffer = Buffer::default();
        let subscriber = json_subscriber(EnvFilter::new("warn"), buffer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("quiet");
            tracing::warn!("loud");
        });
        let lines = lines(&buffer);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["message"], "loud");
    }
}
