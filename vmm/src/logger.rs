//! The log: one line per record on stderr, stamped with milliseconds since
//! the process started, so a boot can be read off the log.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

/// Writes `ember-vmm <ms> <LEVEL> <message>` lines to stderr.
struct StderrLogger {
    start: Instant,
    id: String,
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Installs the logger at `level`; `id` names the instance in every line.
/// Later calls only change the level.
pub fn init(level: LevelFilter, id: &str, start: Instant) {
    let logger = LOGGER.get_or_init(|| StderrLogger {
        start,
        id: id.to_string(),
    });
    // Fails only if another logger is installed, which leaves that one in use.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        let line = format!(
            "ember-vmm[{}] {ms:9.3}ms {:<5} {}\n",
            self.id,
            record.level(),
            record.args()
        );
        // One write per line keeps lines whole; a failed log write has no
        // better place to be reported.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
