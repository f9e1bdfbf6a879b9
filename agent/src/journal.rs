//! The durable store of async invocations and the failure journal:
//! SQLite at `<state-dir>/journal.db` (docs/journal.md).
//!
//! One writer thread owns the writing connection and commits in groups:
//! it takes every write waiting, runs each in a savepoint of one
//! transaction, commits once, and only then answers each of them. A write
//! that must be durable (an accepted event, a final failure) makes its
//! group commit with `synchronous=FULL`: the WAL is fsync'd before anyone
//! hears "yes". Writes that a crash of emberd alone must not lose, but a
//! power cut may (an attempt's start, a success), commit with
//! `synchronous=NORMAL`: written to the WAL (in the page cache, safe from a
//! kill -9) and fsync'd with the next durable group. Losing one of those to
//! a power cut redelivers an event, never loses one.
//!
//! Reads use a second connection (WAL lets it read beside the writer).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

/// The schema version this emberd writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// Forward migrations: entry `i` takes a database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    function       TEXT NOT NULL,
    origin         TEXT NOT NULL,
    source_id      TEXT,
    affinity       TEXT,
    idempotency_key TEXT,
    event          BLOB NOT NULL,
    accepted_ms    INTEGER NOT NULL,
    due_ms         INTEGER NOT NULL,
    state          TEXT NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    interrupted    INTEGER NOT NULL DEFAULT 0,
    version        INTEGER,
    finished_ms    INTEGER,
    result         BLOB,
    result_expires_ms INTEGER,
    error_kind     TEXT,
    error_message  TEXT,
    journal_id     TEXT,
    destination_id TEXT
);
CREATE INDEX events_open ON events(state) WHERE state IN ('queued', 'running', 'retrying');
CREATE INDEX events_function ON events(function, seq);
CREATE TABLE attempts (
    event_id      TEXT NOT NULL,
    n             INTEGER NOT NULL,
    started_ms    INTEGER NOT NULL,
    ended_ms      INTEGER,
    outcome       TEXT NOT NULL,
    version       INTEGER,
    instance      TEXT,
    start         TEXT,
    duration_us   INTEGER,
    error_kind    TEXT,
    error_message TEXT,
    log_tail      TEXT,
    PRIMARY KEY (event_id, n)
) WITHOUT ROWID;
CREATE TABLE journal (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    function      TEXT NOT NULL,
    version       INTEGER,
    invocation_id TEXT,
    error_kind    TEXT,
    error_message TEXT,
    event         BLOB,
    attempts      TEXT NOT NULL DEFAULT '[]',
    detail        TEXT,
    accepted_ms   INTEGER,
    created_ms    INTEGER NOT NULL,
    replayed_as   TEXT,
    replayed_ms   INTEGER,
    bytes         INTEGER NOT NULL
);
CREATE INDEX journal_function ON journal(function, seq);
CREATE INDEX journal_kind ON journal(kind, seq);
CREATE TABLE idempotency (
    function     TEXT NOT NULL,
    key          TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    event_sha256 TEXT NOT NULL,
    accepted_ms  INTEGER NOT NULL,
    PRIMARY KEY (function, key)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE metaevents (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE metaevent_history (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    rule          TEXT NOT NULL,
    at_ms         INTEGER NOT NULL,
    labels        TEXT NOT NULL,
    transition    TEXT NOT NULL,
    value         REAL,
    chain         TEXT NOT NULL,
    fired         INTEGER NOT NULL,
    invocation_id TEXT,
    detail        TEXT
);
CREATE INDEX metaevent_history_rule ON metaevent_history(rule, seq);
CREATE TABLE schedules (
    name      TEXT PRIMARY KEY,
    spec      TEXT NOT NULL,
    anchor_ms INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    fires     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"#,
];

/// How long an idempotency key answers with its first id.
pub const IDEMPOTENCY_MS: i64 = 24 * 3600 * 1000;

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The state directory cannot take the write: full, read-only, I/O
    /// error. Nothing of the write was kept.
    #[error("the state directory cannot take the write ({0})")]
    Unavailable(String),
    /// The idempotency key was used with another event.
    #[error("idempotency key {0:?} was used with a different event in the last 24 h")]
    KeyConflict(String),
    /// No such record.
    #[error("{0}")]
    NotFound(String),
    /// A state the operation does not allow.
    #[error("{0}")]
    Conflict(String),
    /// Anything else.
    #[error("the journal database failed: {0}")]
    Other(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DiskFull) => StoreError::Unavailable(format!("disk full: {e}")),
            Some(ReadOnly) => StoreError::Unavailable(format!("read-only: {e}")),
            Some(SystemIoFailure | CannotOpen | FileLockingProtocolFailed | PermissionDenied) => {
                StoreError::Unavailable(format!("I/O error: {e}"))
            }
            _ => StoreError::Other(e.to_string()),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One write of a group commit: run in a savepoint, answered after the
/// commit (or with the reason nothing was kept).
trait Work: Send {
    fn durable(&self) -> bool;
    /// Runs the write; its error when it failed (its savepoint is rolled
    /// back).
    fn run(&mut self, conn: &Connection) -> Option<StoreError>;
    /// Answers the caller: `committed` is the group's fate.
    fn complete(self: Box<Self>, committed: Result<(), StoreError>);
}

struct Job<R, F> {
    durable: bool,
    f: Option<F>,
    result: Option<Result<R, StoreError>>,
    tx: tokio::sync::oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> Work for Job<R, F>
where
    R: Send,
    F: FnOnce(&Connection) -> Result<R, StoreError> + Send,
{
    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, conn: &Connection) -> Option<StoreError> {
        let f = self.f.take()?;
        let result = f(conn);
        let error = result.as_ref().err().cloned();
        self.result = Some(result);
        error
    }

    fn complete(self: Box<Self>, committed: Result<(), StoreError>) {
        let answer = match (self.result, committed) {
            // Its own failure is its answer, whatever the group did.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(r)), Ok(())) => Ok(r),
            (_, Err(e)) => Err(e),
            (None, Ok(())) => Err(StoreError::Other("the write was not run".into())),
        };
        if let Err(Err(e)) = self.tx.send(answer) {
            // Nobody waited (write_nowait): the log is its only reader.
            tracing::warn!("journal: a write failed: {e}");
        }
    }
}

type Op = Box<dyn Work>;

/// The store.
pub struct Journal {
    path: PathBuf,
    /// Whether the last group commit failed for want of a usable state dir.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: mpsc::Sender<Op>,
    reader: Mutex<Connection>,
}

/// An event to accept.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Its id.
    pub id: String,
    /// The function.
    pub function: String,
    /// `invoke`, `replay`, `destination` or `on_error`.
    pub origin: &'static str,
    /// The invocation or record it came from.
    pub source_id: Option<String>,
    /// Its affinity key.
    pub affinity: Option<String>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// Its bytes.
    pub event: Vec<u8>,
    /// Accepted at, ms.
    pub accepted_ms: i64,
    /// First attempt not before, ms.
    pub due_ms: i64,
}

/// What an accept did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// A new event.
    New(i64),
    /// The idempotency key's earlier event: its id.
    Existing(String),
}

/// An event not yet final, as the dispatcher keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenEvent {
    /// Acceptance order.
    pub seq: i64,
    /// Its id.
    pub id: String,
    /// The function.
    pub function: String,
    /// Where it came from.
    pub origin: String,
    /// Affinity key.
    pub affinity: Option<String>,
    /// Accepted at, ms.
    pub accepted_ms: i64,
    /// Next attempt due, ms.
    pub due_ms: i64,
    /// Attempts begun.
    pub attempts: u32,
    /// Of which interrupted (emberd stopped under them).
    pub interrupted: u32,
}

/// One attempt's end.
#[derive(Debug, Clone, Default)]
pub struct AttemptEnd {
    /// When it started, ms.
    pub started_ms: i64,
    /// `succeeded`, `failed` or `interrupted`.
    pub outcome: &'static str,
    /// The version that ran.
    pub version: Option<u64>,
    /// The instance.
    pub instance: Option<String>,
    /// `warm` or `restored`.
    pub start: Option<&'static str>,
    /// Duration in the function, µs.
    pub duration_us: Option<u64>,
    /// Error kind.
    pub error_kind: Option<String>,
    /// Error message.
    pub error_message: Option<String>,
    /// The end of the function's stderr (≤ 4 KiB).
    pub log_tail: Option<String>,
}

/// Every kind of failure record (the `kind` of [`NewRecord`]).
pub const RECORD_KINDS: [&str; 7] = [
    "retries_exhausted",
    "expired",
    "function_deleted",
    "invalid_event",
    "interrupted",
    "sync_failure",
    "control_action",
];

/// A journal record to write.
#[derive(Debug, Clone, Default)]
pub struct NewRecord {
    /// Its id.
    pub id: String,
    /// The condition, one of [`RECORD_KINDS`].
    pub kind: &'static str,
    /// The function.
    pub function: String,
    /// The version.
    pub version: Option<u64>,
    /// The invocation.
    pub invocation_id: Option<String>,
    /// Final error kind.
    pub error_kind: Option<String>,
    /// Final error message.
    pub error_message: Option<String>,
    /// The event's bytes (sync failures; async records copy the event's).
    pub event: Option<Vec<u8>>,
    /// Attempts (JSON array), when not copied from the event.
    pub attempts: Option<Value>,
    /// What was detected and done (control actions).
    pub detail: Option<Value>,
    /// Accepted at (sync: received at), ms.
    pub accepted_ms: Option<i64>,
}

/// Filters of `GET /journal`.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Of this function.
    pub function: Option<String>,
    /// Of this kind.
    pub kind: Option<String>,
    /// Created at or after, ms.
    pub since_ms: Option<i64>,
    /// Older than this record (its seq): the next page.
    pub before_seq: Option<i64>,
    /// Not replayed yet.
    pub unreplayed: bool,
}

fn open_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

impl Journal {
    /// Opens (creating or migrating) the database at `path`. A database
    /// that is corrupt, or of a newer schema, is refused: the message names
    /// the file and how to recover. It is never replaced by an empty one.
    pub fn open(path: &Path) -> Result<Journal, String> {
        let refuse = |why: String| {
            format!(
                "the journal {} cannot be used: {why}. emberd will not start on it (it never starts empty over accepted events). \
                 To recover: stop emberd, move the file aside (with its -wal and -shm files), salvage what can be with \
                 `sqlite3 {0}.broken .recover | sqlite3 {0}`, or start without it to begin an empty journal",
                path.display()
            )
        };
        let existed = path.exists();
        if !existed {
            // Events are the users' data: readable by emberd alone (the
            // WAL and shared-memory files SQLite makes take this mode).
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot create the journal {}: {e}", path.display()))?;
        }
        let conn = open_connection(path).map_err(|e| refuse(e.to_string()))?;
        if existed {
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(|e| refuse(e.to_string()))?;
            if check != "ok" {
                return Err(refuse(format!("integrity check failed: {check}")));
            }
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| refuse(e.to_string()))?;
        if version > SCHEMA_VERSION {
            return Err(refuse(format!(
                "its schema is version {version}, newer than this emberd's {SCHEMA_VERSION} (a newer emberd wrote it)"
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn
                .unchecked_transaction()
                .map_err(|e| refuse(e.to_string()))?;
            tx.execute_batch(migration)
                .and_then(|_| tx.pragma_update(None, "user_version", i as i64 + 1))
                .and_then(|_| tx.commit())
                .map_err(|e| {
                    format!("cannot migrate {} to schema {}: {e}", path.display(), i + 1)
                })?;
        }
        let reader = open_connection(path).map_err(|e| refuse(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<Op>();
        let writer_path = path.to_path_buf();
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer_failing = failing.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer_loop(writer_path, conn, rx, &writer_failing))
            .map_err(|e| format!("cannot start the journal writer: {e}"))?;
        Ok(Journal {
            failing,
            path: path.to_path_buf(),
            writer: tx,
            reader: Mutex::new(reader),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the state dir refused the last group commit (full,
    /// read-only, I/O error): work that must be recorded waits.
    pub fn failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn submit<R: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<R, StoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(Job {
            durable,
            f: Some(f),
            result: None,
            tx,
        });
        // The writer thread lives as long as the process; if it is gone,
        // the receiver reports the error.
        let _ = self.writer.send(op);
        rx
    }

    /// Runs `f` in the next group commit and waits (async) for the commit.
    pub async fn write<R: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.submit(durable, f)
            .await
            .unwrap_or_else(|_| Err(StoreError::Other("the journal writer stopped".into())))
    }

    /// Queues `f` for the next group commit without waiting for it; a
    /// failure is logged. (For records a later write repeats if need be.)
    pub fn write_nowait(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    ) {
        let rx = self.submit(durable, f);
        drop(rx);
    }

    /// [`Journal::write`] for a blocking thread.
    pub fn write_blocking<R: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.submit(durable, f)
            .blocking_recv()
            .unwrap_or_else(|_| Err(StoreError::Other("the journal writer stopped".into())))
    }

    /// Runs `f` on the reading connection.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, rusqlite::Error>,
    ) -> Result<R, StoreError> {
        let conn = crate::host::lock(&self.reader);
        f(&conn).map_err(StoreError::from)
    }
}

/// The writer thread: group commits until the process ends.
fn writer_loop(
    path: PathBuf,
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    failing: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut synchronous_full = true;
    // After a failure the connection is reopened before the next group (not
    // at once: a state dir still read-only then would give a read-only
    // connection for good).
    let mut stale = false;
    while let Ok(first) = rx.recv() {
        if stale {
            conn = reopen(&path, conn);
            synchronous_full = true;
            stale = conn.is_readonly(c"main").unwrap_or(true);
        }
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|op| op.durable());
        if durable != synchronous_full {
            let level = if durable { "FULL" } else { "NORMAL" };
            if conn.pragma_update(None, "synchronous", level).is_ok() {
                synchronous_full = durable;
            }
        }
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE", []) {
            let e = StoreError::from(e);
            tracing::error!("journal: cannot begin a transaction: {e}");
            failing.store(matches!(e, StoreError::Unavailable(_)), Relaxed);
            for op in batch {
                op.complete(Err(e.clone()));
            }
            stale = true;
            continue;
        }
        let mut unavailable = None;
        for op in batch.iter_mut() {
            // A write that fails is rolled back alone; the others commit.
            if exec(&conn, "SAVEPOINT op", []).is_err() {
                continue;
            }
            if let Some(e) = op.run(&conn) {
                if matches!(e, StoreError::Unavailable(_)) {
                    unavailable.get_or_insert(e);
                }
                let _ = exec(&conn, "ROLLBACK TO op", []);
            }
            let _ = exec(&conn, "RELEASE op", []);
        }
        let unavailable_seen = unavailable.is_some();
        // An I/O failure in one write may have ended the transaction: the
        // group's answer is that failure, not "no transaction".
        let committed = conn
            .execute_batch("COMMIT")
            .map_err(|e| unavailable.unwrap_or_else(|| StoreError::from(e)));
        if let Err(e) = &committed {
            tracing::error!("journal: a commit failed, nothing of it was kept: {e}");
            let _ = exec(&conn, "ROLLBACK", []);
        }
        let failed = committed.is_err();
        failing.store(
            matches!(committed, Err(StoreError::Unavailable(_))) || unavailable_seen,
            Relaxed,
        );
        for op in batch {
            op.complete(committed.clone());
        }
        if failed {
            // A connection that saw an I/O error is not trusted again.
            stale = true;
        }
    }
}

fn reopen(path: &Path, old: Connection) -> Connection {
    match open_connection(path) {
        Ok(conn) => {
            drop(old);
            conn
        }
        Err(e) => {
            tracing::error!("journal: cannot reopen {}: {e}", path.display());
            old
        }
    }
}

/// Runs `sql` as a cached prepared statement (the hot writes run per
/// event: parsing them each time would cost more than running them).
fn exec<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// The SHA-256 of an event, hex (what an idempotency key is checked against).
pub fn event_sha256(event: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(event)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether an event in `state` is final.
pub fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "failed")
}

/// Accepts `ev`: inserts it, and its idempotency key, unless the key names
/// an event of the last 24 h (its id, or a conflict if that event's bytes
/// differ).
pub fn accept_tx(conn: &Connection, ev: &NewEvent, now: i64) -> Result<Accepted, StoreError> {
    let sha = event_sha256(&ev.event);
    if let Some(key) = &ev.idempotency_key {
        let earlier: Option<(String, String, i64)> = conn
            .query_row(
                "SELECT event_id, event_sha256, accepted_ms FROM idempotency WHERE function = ?1 AND key = ?2",
                params![ev.function, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((id, earlier_sha, at)) = earlier {
            if at > now - IDEMPOTENCY_MS {
                return if earlier_sha == sha {
                    Ok(Accepted::Existing(id))
                } else {
                    Err(StoreError::KeyConflict(key.clone()))
                };
            }
        }
        exec(
            conn,
            "INSERT OR REPLACE INTO idempotency (function, key, event_id, event_sha256, accepted_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![ev.function, key, ev.id, sha, ev.accepted_ms],
        )?;
    }
    exec(
        conn,
        "INSERT INTO events (id, function, origin, source_id, affinity, idempotency_key, event, accepted_ms, due_ms, state) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued')",
        params![
            ev.id,
            ev.function,
            ev.origin,
            ev.source_id,
            ev.affinity,
            ev.idempotency_key,
            ev.event,
            ev.accepted_ms,
            ev.due_ms
        ],
    )?;
    Ok(Accepted::New(conn.last_insert_rowid()))
}

impl NewEvent {
    /// The dispatcher's view of it once accepted as `seq`.
    pub fn open(&self, seq: i64) -> OpenEvent {
        OpenEvent {
            seq,
            id: self.id.clone(),
            function: self.function.clone(),
            origin: self.origin.to_string(),
            affinity: self.affinity.clone(),
            accepted_ms: self.accepted_ms,
            due_ms: self.due_ms,
            attempts: 0,
            interrupted: 0,
        }
    }
}

/// At start: attempts that were running when emberd stopped become
/// `interrupted`, their events due again now. Returns every open event.
pub fn recover_tx(conn: &Connection, now: i64) -> Result<Vec<OpenEvent>, StoreError> {
    exec(
        conn,
        "UPDATE attempts SET outcome = 'interrupted', ended_ms = ?1, \
         error_kind = 'interrupted', error_message = 'emberd stopped during the attempt' \
         WHERE outcome = 'running'",
        params![now],
    )?;
    exec(
        conn,
        "UPDATE events SET state = 'retrying', interrupted = interrupted + 1, due_ms = ?1 WHERE state = 'running'",
        params![now],
    )?;
    open_events(conn)
}

/// Every event not yet final, in acceptance order.
pub fn open_events(conn: &Connection) -> Result<Vec<OpenEvent>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT seq, id, function, origin, affinity, accepted_ms, due_ms, attempts, interrupted \
         FROM events WHERE state IN ('queued', 'running', 'retrying') ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(OpenEvent {
            seq: r.get(0)?,
            id: r.get(1)?,
            function: r.get(2)?,
            origin: r.get(3)?,
            affinity: r.get(4)?,
            accepted_ms: r.get(5)?,
            due_ms: r.get(6)?,
            attempts: r.get(7)?,
            interrupted: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// An event's bytes.
pub fn event_bytes(conn: &Connection, id: &str) -> Result<Option<Vec<u8>>, rusqlite::Error> {
    conn.prepare_cached("SELECT event FROM events WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()
}

/// Attempt `n` of event `id` begins.
pub fn attempt_start_tx(
    conn: &Connection,
    id: &str,
    n: u32,
    now: i64,
    version: u64,
) -> Result<(), StoreError> {
    let changed = exec(
        conn,
        "UPDATE events SET state = 'running', attempts = max(attempts, ?2), version = ?3 \
         WHERE id = ?1 AND state IN ('queued', 'retrying', 'running')",
        params![id, n, version as i64],
    )?;
    if changed != 1 {
        return Err(StoreError::Conflict(format!("event {id} is not open")));
    }
    exec(
        conn,
        "INSERT OR REPLACE INTO attempts (event_id, n, started_ms, outcome, version) VALUES (?1, ?2, ?3, 'running', ?4)",
        params![id, n, now, version as i64],
    )?;
    Ok(())
}

/// Attempt `n` of event `id` ended.
pub fn attempt_end_tx(
    conn: &Connection,
    id: &str,
    n: u32,
    end: &AttemptEnd,
    now: i64,
) -> Result<(), StoreError> {
    // Its start is written without waiting (attempt_start_tx): if that
    // write was lost, the attempt is recorded whole here.
    exec(
        conn,
        "INSERT INTO attempts (event_id, n, started_ms, ended_ms, outcome, version, instance, start, duration_us, \
         error_kind, error_message, log_tail) VALUES (?1, ?2, ?12, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
         ON CONFLICT (event_id, n) DO UPDATE SET ended_ms = ?3, outcome = ?4, version = coalesce(?5, version), \
         instance = ?6, start = ?7, duration_us = ?8, error_kind = ?9, error_message = ?10, log_tail = ?11",
        params![
            id,
            n,
            now,
            end.outcome,
            end.version.map(|v| v as i64),
            end.instance,
            end.start,
            end.duration_us.map(|d| d as i64),
            end.error_kind,
            end.error_message,
            end.log_tail,
            end.started_ms
        ],
    )?;
    exec(
        conn,
        "UPDATE events SET attempts = max(attempts, ?2), version = coalesce(?3, version) WHERE id = ?1",
        params![id, n, end.version.map(|v| v as i64)],
    )?;
    Ok(())
}

/// Event `id` succeeded with `result`, kept until `expires_ms`.
pub fn succeeded_tx(
    conn: &Connection,
    id: &str,
    result: &[u8],
    now: i64,
    expires_ms: i64,
) -> Result<(), StoreError> {
    let changed = exec(
        conn,
        "UPDATE events SET state = 'succeeded', finished_ms = ?2, result = ?3, result_expires_ms = ?4, \
         error_kind = NULL, error_message = NULL, event = x'' WHERE id = ?1 AND state IN ('queued', 'running', 'retrying')",
        params![id, now, result, expires_ms],
    )?;
    if changed != 1 {
        return Err(StoreError::Conflict(format!("event {id} is not open")));
    }
    Ok(())
}

/// Event `id` waits for another attempt at `due_ms`; `interrupted` when
/// the attempt did not count (emberd stopping under it).
pub fn retry_tx(
    conn: &Connection,
    id: &str,
    due_ms: i64,
    interrupted: bool,
    error: Option<(&str, &str)>,
) -> Result<(), StoreError> {
    exec(
        conn,
        "UPDATE events SET state = 'retrying', due_ms = ?2, interrupted = interrupted + ?3, \
         error_kind = ?4, error_message = ?5 WHERE id = ?1 AND state IN ('queued', 'running', 'retrying')",
        params![
            id,
            due_ms,
            i64::from(interrupted),
            error.map(|e| e.0),
            error.map(|e| e.1)
        ],
    )?;
    Ok(())
}

/// Every attempt of event `id`, as the API shows them.
pub fn attempts_json(conn: &Connection, id: &str) -> Result<Value, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT n, started_ms, ended_ms, outcome, version, instance, start, duration_us, error_kind, error_message, log_tail \
         FROM attempts WHERE event_id = ?1 ORDER BY n",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        let kind: Option<String> = r.get(8)?;
        let message: Option<String> = r.get(9)?;
        Ok(json!({
            "n": r.get::<_, i64>(0)?,
            "started_ms": r.get::<_, i64>(1)?,
            "ended_ms": r.get::<_, Option<i64>>(2)?,
            "outcome": r.get::<_, String>(3)?,
            "version": r.get::<_, Option<i64>>(4)?,
            "instance": r.get::<_, Option<String>>(5)?,
            "start": r.get::<_, Option<String>>(6)?,
            "duration_us": r.get::<_, Option<i64>>(7)?,
            "error": kind.map(|kind| json!({ "kind": kind, "message": message })),
            "log_tail": r.get::<_, Option<String>>(10)?,
        }))
    })?;
    Ok(Value::Array(rows.collect::<Result<_, _>>()?))
}

/// How an event finally failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The journal record's kind (the condition).
    pub condition: &'static str,
    /// The error kind (of the last attempt, or the condition's own).
    pub error_kind: String,
    /// Its message.
    pub message: String,
    /// The version it last ran as (or would have).
    pub version: Option<u64>,
    /// The journal record's id.
    pub record_id: String,
    /// The on-failure destination and the id of the event it gets.
    pub destination: Option<(String, String)>,
    /// When the failed event's row may go, ms.
    pub expires_ms: i64,
}

/// Event `id` failed for good: it becomes `failed`, a journal record keeps
/// it (its bytes, attempts, timestamps), and the destination, if any, gets
/// an event describing it, all in one transaction. Returns the
/// destination's event, to dispatch.
pub fn failed_tx(
    conn: &Connection,
    id: &str,
    failure: &Failure,
    now: i64,
) -> Result<Option<OpenEvent>, StoreError> {
    let row: Option<(String, Vec<u8>, i64, String)> = conn
        .query_row(
            "SELECT function, event, accepted_ms, state FROM events WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((function, event, accepted_ms, state)) = row else {
        return Err(StoreError::NotFound(format!("no event {id}")));
    };
    if is_final(&state) {
        return Err(StoreError::Conflict(format!(
            "event {id} is already {state}"
        )));
    }
    let attempts = attempts_json(conn, id)?;
    let record = NewRecord {
        id: failure.record_id.clone(),
        kind: failure.condition,
        function: function.clone(),
        version: failure.version,
        invocation_id: Some(id.to_string()),
        error_kind: Some(failure.error_kind.clone()),
        error_message: Some(failure.message.clone()),
        event: Some(event.clone()),
        attempts: Some(attempts.clone()),
        detail: None,
        accepted_ms: Some(accepted_ms),
    };
    insert_record_tx(conn, &record, now)?;
    exec(
        conn,
        "UPDATE events SET state = 'failed', finished_ms = ?2, error_kind = ?3, error_message = ?4, \
         journal_id = ?5, destination_id = ?6, result_expires_ms = ?7, version = coalesce(?8, version) WHERE id = ?1",
        params![
            id,
            now,
            failure.error_kind,
            failure.message,
            failure.record_id,
            failure.destination.as_ref().map(|d| &d.1),
            failure.expires_ms,
            failure.version.map(|v| v as i64)
        ],
    )?;
    let Some((target, new_id)) = &failure.destination else {
        return Ok(None);
    };
    use base64::Engine;
    let body = json!({
        "source_id": id,
        "function": function,
        "version": failure.version,
        "condition": failure.condition,
        "error": { "kind": failure.error_kind, "message": failure.message },
        "attempts": attempts,
        "event_base64": base64::engine::general_purpose::STANDARD.encode(&event),
        "timestamps": { "accepted_ms": accepted_ms, "failed_ms": now },
        "journal_id": failure.record_id,
    });
    let destination = NewEvent {
        id: new_id.clone(),
        function: target.clone(),
        origin: "destination",
        source_id: Some(id.to_string()),
        affinity: None,
        idempotency_key: None,
        event: body.to_string().into_bytes(),
        accepted_ms: now,
        due_ms: now,
    };
    match accept_tx(conn, &destination, now)? {
        Accepted::New(seq) => Ok(Some(destination.open(seq))),
        Accepted::Existing(_) => Ok(None),
    }
}

/// Writes a journal record.
pub fn insert_record_tx(conn: &Connection, rec: &NewRecord, now: i64) -> Result<(), StoreError> {
    let attempts = rec
        .attempts
        .clone()
        .unwrap_or_else(|| Value::Array(Vec::new()))
        .to_string();
    let detail = rec.detail.as_ref().map(Value::to_string);
    let bytes = rec.event.as_ref().map_or(0, Vec::len)
        + attempts.len()
        + detail.as_ref().map_or(0, String::len)
        + rec.error_message.as_ref().map_or(0, String::len)
        + 256;
    exec(
        conn,
        "INSERT INTO journal (id, kind, function, version, invocation_id, error_kind, error_message, event, attempts, \
         detail, accepted_ms, created_ms, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            rec.id,
            rec.kind,
            rec.function,
            rec.version.map(|v| v as i64),
            rec.invocation_id,
            rec.error_kind,
            rec.error_message,
            rec.event,
            attempts,
            detail,
            rec.accepted_ms,
            now,
            bytes as i64
        ],
    )?;
    Ok(())
}

/// `GET /invocations/{id}`: the event, its attempts, its result while
/// kept. An event whose row was purged is found through its journal record.
pub fn invocation(conn: &Connection, id: &str) -> Result<Option<Value>, rusqlite::Error> {
    let row = conn
        .query_row(
            "SELECT id, function, origin, source_id, state, accepted_ms, due_ms, attempts, interrupted, version, \
             finished_ms, result, error_kind, error_message, journal_id, destination_id, affinity, seq \
             FROM events WHERE id = ?1",
            params![id],
            |r| {
                let state: String = r.get(4)?;
                let kind: Option<String> = r.get(12)?;
                let message: Option<String> = r.get(13)?;
                let mut v = json!({
                    "id": r.get::<_, String>(0)?,
                    "function": r.get::<_, String>(1)?,
                    "origin": r.get::<_, String>(2)?,
                    "source_id": r.get::<_, Option<String>>(3)?,
                    "state": state,
                    "accepted_ms": r.get::<_, i64>(5)?,
                    "interrupted": r.get::<_, i64>(8)?,
                    "version": r.get::<_, Option<i64>>(9)?,
                    "finished_ms": r.get::<_, Option<i64>>(10)?,
                    "error": kind.map(|kind| json!({ "kind": kind, "message": message })),
                    "journal_id": r.get::<_, Option<String>>(14)?,
                    "destination_id": r.get::<_, Option<String>>(15)?,
                    "affinity": r.get::<_, Option<String>>(16)?,
                    "seq": r.get::<_, i64>(17)?,
                });
                if !is_final(&state) {
                    v["next_attempt_ms"] = json!(r.get::<_, i64>(6)?);
                }
                if state == "succeeded" {
                    let result: Option<Vec<u8>> = r.get(11)?;
                    match result {
                        None => v["result_expired"] = json!(true),
                        Some(bytes) => match String::from_utf8(bytes) {
                            Ok(text) => v["result"] = json!(text),
                            Err(e) => {
                                use base64::Engine;
                                v["result_base64"] = json!(
                                    base64::engine::general_purpose::STANDARD.encode(e.as_bytes())
                                )
                            }
                        },
                    }
                }
                Ok(v)
            },
        )
        .optional()?;
    match row {
        Some(mut v) => {
            v["attempts"] = attempts_json(conn, id)?;
            Ok(Some(v))
        }
        None => {
            // Purged: its journal record remembers it.
            conn.query_row(
                "SELECT id, function, version, error_kind, error_message, accepted_ms, created_ms, attempts FROM journal \
                 WHERE invocation_id = ?1 AND kind != 'sync_failure' ORDER BY seq DESC LIMIT 1",
                params![id],
                |r| {
                    let attempts: String = r.get(7)?;
                    Ok(json!({
                        "id": id,
                        "function": r.get::<_, String>(1)?,
                        "state": "failed",
                        "version": r.get::<_, Option<i64>>(2)?,
                        "error": { "kind": r.get::<_, Option<String>>(3)?, "message": r.get::<_, Option<String>>(4)? },
                        "accepted_ms": r.get::<_, Option<i64>>(5)?,
                        "finished_ms": r.get::<_, i64>(6)?,
                        "journal_id": r.get::<_, String>(0)?,
                        "attempts": serde_json::from_str::<Value>(&attempts).unwrap_or(Value::Null),
                    }))
                },
            )
            .optional()
        }
    }
}

/// `GET /invocations`: events newest first, without their results.
pub fn invocations(
    conn: &Connection,
    function: Option<&str>,
    state: Option<&str>,
    before_seq: Option<i64>,
    limit: u32,
) -> Result<Vec<Value>, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT id, function, origin, state, accepted_ms, attempts, interrupted, finished_ms, error_kind, journal_id, seq, source_id \
         FROM events WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR seq < ?3) \
         ORDER BY seq DESC LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![function, state, before_seq, limit], |r| {
        Ok(json!({
            "id": r.get::<_, String>(0)?,
            "function": r.get::<_, String>(1)?,
            "origin": r.get::<_, String>(2)?,
            "state": r.get::<_, String>(3)?,
            "accepted_ms": r.get::<_, i64>(4)?,
            "attempts": r.get::<_, i64>(5)?,
            "interrupted": r.get::<_, i64>(6)?,
            "finished_ms": r.get::<_, Option<i64>>(7)?,
            "error_kind": r.get::<_, Option<String>>(8)?,
            "journal_id": r.get::<_, Option<String>>(9)?,
            "seq": r.get::<_, i64>(10)?,
            "source_id": r.get::<_, Option<String>>(11)?,
        }))
    })?;
    rows.collect()
}

fn record_json(r: &rusqlite::Row<'_>) -> Result<Value, rusqlite::Error> {
    let attempts: String = r.get(9)?;
    let detail: Option<String> = r.get(10)?;
    Ok(json!({
        "id": r.get::<_, String>(0)?,
        "kind": r.get::<_, String>(1)?,
        "function": r.get::<_, String>(2)?,
        "version": r.get::<_, Option<i64>>(3)?,
        "invocation_id": r.get::<_, Option<String>>(4)?,
        "error": { "kind": r.get::<_, Option<String>>(5)?, "message": r.get::<_, Option<String>>(6)? },
        "event_bytes": r.get::<_, Option<i64>>(7)?,
        "accepted_ms": r.get::<_, Option<i64>>(8)?,
        "attempts": serde_json::from_str::<Value>(&attempts).unwrap_or(Value::Null),
        "detail": detail.and_then(|d| serde_json::from_str::<Value>(&d).ok()),
        "created_ms": r.get::<_, i64>(11)?,
        "replayed_as": r.get::<_, Option<String>>(12)?,
        "replayed_ms": r.get::<_, Option<i64>>(13)?,
        "seq": r.get::<_, i64>(14)?,
    }))
}

const RECORD_COLUMNS: &str =
    "id, kind, function, version, invocation_id, error_kind, error_message, length(event), \
     accepted_ms, attempts, detail, created_ms, replayed_as, replayed_ms, seq";

/// `GET /journal`: records newest first.
pub fn records(
    conn: &Connection,
    filter: &RecordFilter,
    limit: u32,
) -> Result<Vec<Value>, rusqlite::Error> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {RECORD_COLUMNS} FROM journal WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR kind = ?2) \
         AND (?3 IS NULL OR created_ms >= ?3) AND (?4 IS NULL OR seq < ?4) AND (?5 = 0 OR replayed_as IS NULL) \
         ORDER BY seq DESC LIMIT ?6"
    ))?;
    let rows = stmt.query_map(
        params![
            filter.function,
            filter.kind,
            filter.since_ms,
            filter.before_seq,
            filter.unreplayed,
            limit
        ],
        record_json,
    )?;
    rows.collect()
}

/// `GET /journal/{id}`.
pub fn record(conn: &Connection, id: &str) -> Result<Option<Value>, rusqlite::Error> {
    conn.query_row(
        &format!("SELECT {RECORD_COLUMNS} FROM journal WHERE id = ?1"),
        params![id],
        record_json,
    )
    .optional()
}

/// A record's function and its event bytes (`None`: it has none).
pub type RecordEvent = (String, Option<Vec<u8>>);

/// A record's function and event bytes (`None` inside: it has none).
pub fn record_event(conn: &Connection, id: &str) -> Result<Option<RecordEvent>, rusqlite::Error> {
    conn.query_row(
        "SELECT function, event FROM journal WHERE id = ?1",
        params![id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

/// A record's function.
pub fn record_function(conn: &Connection, id: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row(
        "SELECT function FROM journal WHERE id = ?1",
        params![id],
        |r| r.get(0),
    )
    .optional()
}

/// Replays record `record_id` as the new event `ev` (its bytes are the
/// record's); both are linked.
pub fn replay_tx(
    conn: &Connection,
    record_id: &str,
    mut ev: NewEvent,
    now: i64,
) -> Result<OpenEvent, StoreError> {
    let Some((_, event)) = record_event(conn, record_id)? else {
        return Err(StoreError::NotFound(format!(
            "no journal record {record_id}"
        )));
    };
    let Some(event) = event else {
        return Err(StoreError::Conflict(format!(
            "journal record {record_id} holds no event to replay (a control action)"
        )));
    };
    ev.event = event;
    ev.source_id = Some(record_id.to_string());
    let Accepted::New(seq) = accept_tx(conn, &ev, now)? else {
        return Err(StoreError::Other("a replay has no idempotency key".into()));
    };
    exec(
        conn,
        "UPDATE journal SET replayed_as = ?2, replayed_ms = ?3 WHERE id = ?1",
        params![record_id, ev.id, now],
    )?;
    Ok(ev.open(seq))
}

/// Deletes a record.
pub fn delete_record_tx(conn: &Connection, id: &str) -> Result<(), StoreError> {
    if exec(conn, "DELETE FROM journal WHERE id = ?1", params![id])? == 0 {
        return Err(StoreError::NotFound(format!("no journal record {id}")));
    }
    Ok(())
}

/// Limits housekeeping keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Journal records kept at most.
    pub max_records: u64,
    /// Journal bytes kept at most.
    pub max_bytes: u64,
    /// Results of succeeded events kept at most, bytes.
    pub results_max_bytes: u64,
}

/// What housekeeping removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Journal records (over the limits).
    pub records: u64,
    /// Final events past their retention.
    pub events: u64,
    /// Results dropped (expired or over the bound).
    pub results: u64,
    /// Idempotency keys older than 24 h.
    pub keys: u64,
}

/// Drops what is past its time or over its bound, oldest first.
pub fn housekeeping_tx(conn: &Connection, now: i64, keep: Retention) -> Result<Purged, StoreError> {
    let expired = exec(
        conn,
        "UPDATE events SET result = NULL WHERE state = 'succeeded' AND result IS NOT NULL AND result_expires_ms <= ?1",
        params![now],
    )?;
    let mut purged = Purged {
        results: expired as u64,
        ..Purged::default()
    };
    // Final events go with their result's retention (failed ones stay in
    // the journal).
    let ids: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT id FROM events WHERE state IN ('succeeded', 'failed') AND result_expires_ms <= ?1 LIMIT 10000",
        )?;
        let rows = stmt.query_map(params![now], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for id in &ids {
        exec(
            conn,
            "DELETE FROM attempts WHERE event_id = ?1",
            params![id],
        )?;
        exec(conn, "DELETE FROM events WHERE id = ?1", params![id])?;
    }
    purged.events = ids.len() as u64;
    let total: i64 = conn.query_row(
        "SELECT coalesce(sum(length(result)), 0) FROM events WHERE result IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    if total as u64 > keep.results_max_bytes {
        let mut stmt = conn.prepare(
            "SELECT seq, length(result) FROM events WHERE result IS NOT NULL ORDER BY seq",
        )?;
        let rows: Vec<(i64, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut over = total as u64 - keep.results_max_bytes;
        for (seq, len) in rows {
            if over == 0 {
                break;
            }
            exec(
                conn,
                "UPDATE events SET result = NULL WHERE seq = ?1",
                params![seq],
            )?;
            over = over.saturating_sub(len as u64);
            purged.results += 1;
        }
    }
    purged.keys = exec(
        conn,
        "DELETE FROM idempotency WHERE accepted_ms <= ?1",
        params![now - IDEMPOTENCY_MS],
    )? as u64;
    let (count, bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(bytes), 0) FROM journal",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if count as u64 > keep.max_records {
        purged.records += exec(
            conn,
            "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal ORDER BY seq LIMIT ?1)",
            params![count - keep.max_records as i64],
        )? as u64;
    }
    if bytes as u64 > keep.max_bytes {
        let mut over = bytes as u64 - keep.max_bytes;
        let rows: Vec<(i64, i64)> = {
            let mut stmt = conn.prepare("SELECT seq, bytes FROM journal ORDER BY seq")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (seq, len) in rows {
            if over == 0 {
                break;
            }
            purged.records +=
                exec(conn, "DELETE FROM journal WHERE seq = ?1", params![seq])? as u64;
            over = over.saturating_sub(len as u64);
        }
    }
    Ok(purged)
}

/// Journal records by kind (for /metrics).
pub fn counts_by_kind(conn: &Connection) -> Result<Vec<(String, i64)>, rusqlite::Error> {
    let mut stmt =
        conn.prepare("SELECT kind, count(*) FROM journal GROUP BY kind ORDER BY kind")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The stored metaevent rules: (name, spec).
pub fn metaevents(conn: &Connection) -> Result<Vec<(String, String)>, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT name, spec FROM metaevents ORDER BY name")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Stores (or replaces) a metaevent rule.
pub fn put_metaevent_tx(
    conn: &Connection,
    name: &str,
    spec: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO metaevents (name, spec, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, updated_ms = excluded.updated_ms",
        params![name, spec, now],
    )?;
    Ok(())
}

/// Removes a metaevent rule and its history.
pub fn delete_metaevent_tx(conn: &Connection, name: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM metaevents WHERE name = ?1", params![name])?;
    conn.execute(
        "DELETE FROM metaevent_history WHERE rule = ?1",
        params![name],
    )?;
    Ok(())
}

/// Adds a row to a rule's history.
pub fn history_tx(
    conn: &Connection,
    row: &crate::metaevents::HistoryRow,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO metaevent_history (rule, at_ms, labels, transition, value, chain, fired, invocation_id, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    stmt.execute(params![
        row.rule,
        row.at_ms,
        row.labels.to_string(),
        row.transition,
        row.value,
        serde_json::to_string(&row.chain).unwrap_or_default(),
        row.fired,
        row.invocation_id,
        row.detail,
    ])?;
    Ok(())
}

/// A rule's history, newest first: `limit` rows before seq `before`.
pub fn history(
    conn: &Connection,
    rule: &str,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<Value>, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, labels, transition, value, chain, fired, invocation_id, detail
         FROM metaevent_history WHERE rule = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![rule, before.unwrap_or(i64::MAX), limit], |r| {
        let labels: String = r.get(2)?;
        let chain: String = r.get(5)?;
        Ok(json!({
            "seq": r.get::<_, i64>(0)?,
            "at_ms": r.get::<_, i64>(1)?,
            "labels": serde_json::from_str::<Value>(&labels).unwrap_or(Value::Null),
            "transition": r.get::<_, String>(3)?,
            "value": r.get::<_, Option<f64>>(4)?,
            "chain": serde_json::from_str::<Value>(&chain).unwrap_or(Value::Null),
            "fired": r.get::<_, bool>(6)?,
            "invocation_id": r.get::<_, Option<String>>(7)?,
            "detail": r.get::<_, Option<String>>(8)?,
        }))
    })?;
    rows.collect()
}

/// Keeps each rule's newest `keep` history rows.
pub fn trim_history_tx(conn: &Connection, keep: i64) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM metaevent_history WHERE seq IN (
             SELECT seq FROM (
                 SELECT seq, ROW_NUMBER() OVER (PARTITION BY rule ORDER BY seq DESC) AS n
                 FROM metaevent_history
             ) WHERE n > ?1
         )",
        params![keep],
    )?;
    Ok(())
}

/// A stored schedule: name, spec, anchor_ms, last_ms, fires.
pub type StoredSchedule = (String, String, i64, i64, i64);

/// The stored schedules.
pub fn schedules(conn: &Connection) -> Result<Vec<StoredSchedule>, rusqlite::Error> {
    let mut stmt =
        conn.prepare("SELECT name, spec, anchor_ms, last_ms, fires FROM schedules ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    rows.collect()
}

/// Stores (or replaces) a schedule; it counts from `now`.
pub fn put_schedule_tx(
    conn: &Connection,
    name: &str,
    spec: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO schedules (name, spec, anchor_ms, last_ms, fires) VALUES (?1, ?2, ?3, ?3, 0)
         ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, anchor_ms = excluded.anchor_ms,
             last_ms = excluded.last_ms, fires = 0",
        params![name, spec, now],
    )?;
    Ok(())
}

/// Removes a schedule.
pub fn delete_schedule_tx(conn: &Connection, name: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM schedules WHERE name = ?1", params![name])?;
    Ok(())
}

/// Records a schedule's fire (or, not `fired`, a skipped one) for time
/// `at` — of the schedule PUT at `anchor` (not one that replaced it since).
pub fn schedule_fired_tx(
    conn: &Connection,
    name: &str,
    anchor: i64,
    at: i64,
    fired: bool,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE schedules SET last_ms = ?3, fires = fires + ?4 WHERE name = ?1 AND anchor_ms = ?2",
        params![name, anchor, at, fired as i64],
    )?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A database path in a directory of its own, removed when dropped.
    pub(crate) struct TempDb(pub PathBuf);

    impl TempDb {
        pub(crate) fn new(name: &str) -> TempDb {
            let dir = std::env::temp_dir().join(format!(
                "ember-journal-{name}-{}-{}",
                std::process::id(),
                crate::functions::random_u64()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDb(dir.join("journal.db"))
        }
    }

    impl std::ops::Deref for TempDb {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn event(id: &str, key: Option<&str>, bytes: &[u8]) -> NewEvent {
        NewEvent {
            id: id.into(),
            function: "f".into(),
            origin: "invoke",
            source_id: None,
            affinity: None,
            idempotency_key: key.map(str::to_string),
            event: bytes.to_vec(),
            accepted_ms: 1000,
            due_ms: 1000,
        }
    }

    fn accept(j: &Journal, ev: NewEvent, now: i64) -> Result<Accepted, StoreError> {
        j.write_blocking(true, move |c| accept_tx(c, &ev, now))
    }

    #[test]
    fn an_idempotency_key_answers_its_first_id_for_a_day_and_conflicts_on_other_bytes() {
        let db = TempDb::new("idem");
        let j = Journal::open(&db).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&*db).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the journal is emberd's alone");
        assert!(matches!(
            accept(&j, event("a", Some("k"), b"x"), 1000),
            Ok(Accepted::New(_))
        ));
        assert_eq!(
            accept(&j, event("b", Some("k"), b"x"), 2000),
            Ok(Accepted::Existing("a".into()))
        );
        assert_eq!(
            accept(&j, event("c", Some("k"), b"y"), 2000),
            Err(StoreError::KeyConflict("k".into()))
        );
        // A day later the key is free again.
        assert!(matches!(
            accept(&j, event("d", Some("k"), b"y"), 1000 + IDEMPOTENCY_MS + 1),
            Ok(Accepted::New(_))
        ));
        let open = j.read(|c| Ok(open_events(c))).unwrap().unwrap();
        let ids: Vec<&str> = open.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "d"],
            "no event for the repeated or conflicting accepts"
        );
    }

    #[test]
    fn recovery_marks_running_attempts_interrupted_and_reopens_their_events() {
        let db = TempDb::new("recover");
        let path = db.to_path_buf();
        {
            let j = Journal::open(&path).unwrap();
            accept(&j, event("a", None, b"x"), 1000).unwrap();
            accept(&j, event("b", None, b"y"), 1000).unwrap();
            j.write_blocking(false, |c| attempt_start_tx(c, "a", 1, 1100, 1))
                .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let open = j.write_blocking(false, |c| recover_tx(c, 5000)).unwrap();
        assert_eq!(open.len(), 2);
        assert_eq!(
            (
                open[0].id.as_str(),
                open[0].attempts,
                open[0].interrupted,
                open[0].due_ms
            ),
            ("a", 1, 1, 5000)
        );
        assert_eq!((open[1].attempts, open[1].interrupted), (0, 0));
        let v = j.read(|c| invocation(c, "a")).unwrap().unwrap();
        assert_eq!(v["state"], "retrying");
        assert_eq!(v["attempts"][0]["outcome"], "interrupted");
    }

    #[test]
    fn a_final_failure_is_journaled_once_with_its_event_and_its_destination_queued() {
        let db = TempDb::new("fail");
        let j = Journal::open(&db).unwrap();
        accept(&j, event("a", None, b"\x00\x01"), 1000).unwrap();
        j.write_blocking(false, |c| attempt_start_tx(c, "a", 1, 1100, 3))
            .unwrap();
        let failure = Failure {
            condition: "retries_exhausted",
            error_kind: "trap".into(),
            message: "boom".into(),
            version: Some(3),
            record_id: "r1".into(),
            destination: Some(("dest".into(), "d1".into())),
            expires_ms: 10_000,
        };
        let f = failure.clone();
        let dest = j
            .write_blocking(true, move |c| {
                attempt_end_tx(
                    c,
                    "a",
                    1,
                    &AttemptEnd {
                        outcome: "failed",
                        error_kind: Some("trap".into()),
                        ..Default::default()
                    },
                    1200,
                )?;
                failed_tx(c, "a", &f, 1300)
            })
            .unwrap()
            .expect("a destination event");
        assert_eq!(
            (dest.function.as_str(), dest.origin.as_str()),
            ("dest", "destination")
        );
        // Twice is refused: an event ends once.
        let f = Failure {
            record_id: "r2".into(),
            ..failure
        };
        assert!(matches!(
            j.write_blocking(true, move |c| failed_tx(c, "a", &f, 1400)),
            Err(StoreError::Conflict(_))
        ));
        let r1 = j.read(|c| record(c, "r1")).unwrap().unwrap();
        assert_eq!(r1["kind"], "retries_exhausted");
        assert_eq!(r1["attempts"][0]["error"]["kind"], "trap");
        assert_eq!(r1["event_bytes"], 2);
        assert!(j.read(|c| record(c, "r2")).unwrap().is_none());
        let body: Value =
            serde_json::from_slice(&j.read(|c| event_bytes(c, "d1")).unwrap().unwrap()).unwrap();
        assert_eq!(body["source_id"], "a");
        assert_eq!(body["event_base64"], "AAE=");
        assert_eq!(body["error"]["kind"], "trap");
        // Replayed: a new event with the record's bytes, both linked.
        let replay = event("n1", None, b"");
        let opened = j
            .write_blocking(true, move |c| replay_tx(c, "r1", replay, 2000))
            .unwrap();
        assert_eq!(opened.id, "n1");
        assert_eq!(
            j.read(|c| event_bytes(c, "n1")).unwrap().unwrap(),
            b"\x00\x01"
        );
        assert_eq!(
            j.read(|c| record(c, "r1")).unwrap().unwrap()["replayed_as"],
            "n1"
        );
        assert_eq!(
            j.read(|c| invocation(c, "n1")).unwrap().unwrap()["source_id"],
            "r1"
        );
    }

    #[test]
    fn an_attempt_whose_start_was_lost_is_recorded_whole_at_its_end() {
        let db = TempDb::new("nostart");
        let j = Journal::open(&db).unwrap();
        accept(&j, event("a", None, b"x"), 1000).unwrap();
        j.write_blocking(false, |c| {
            let end = AttemptEnd {
                started_ms: 1100,
                outcome: "succeeded",
                version: Some(2),
                instance: Some("f-1".into()),
                ..Default::default()
            };
            attempt_end_tx(c, "a", 1, &end, 1200)?;
            succeeded_tx(c, "a", b"ok", 1200, 9999)
        })
        .unwrap();
        let v = j.read(|c| invocation(c, "a")).unwrap().unwrap();
        assert_eq!(
            (v["state"].as_str(), v["version"].as_i64()),
            (Some("succeeded"), Some(2))
        );
        assert_eq!(v["attempts"][0]["started_ms"], 1100);
        assert_eq!(v["attempts"][0]["instance"], "f-1");
        // Final is final.
        assert!(matches!(
            j.write_blocking(false, |c| succeeded_tx(c, "a", b"again", 1300, 9999)),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn retention_purges_the_oldest_records_and_expired_events() {
        let db = TempDb::new("retention");
        let j = Journal::open(&db).unwrap();
        for i in 0..5 {
            let rec = NewRecord {
                id: format!("r{i}"),
                kind: "control_action",
                function: "f".into(),
                ..Default::default()
            };
            j.write_blocking(true, move |c| insert_record_tx(c, &rec, i))
                .unwrap();
        }
        accept(&j, event("a", None, b"x"), 1000).unwrap();
        j.write_blocking(false, |c| {
            attempt_start_tx(c, "a", 1, 1000, 1)?;
            succeeded_tx(c, "a", b"result", 1000, 5000)
        })
        .unwrap();
        let keep = Retention {
            max_records: 3,
            max_bytes: u64::MAX,
            results_max_bytes: u64::MAX,
        };
        let purged = j
            .write_blocking(false, move |c| housekeeping_tx(c, 4000, keep))
            .unwrap();
        assert_eq!((purged.records, purged.events), (2, 0));
        let left: Vec<Value> = j
            .read(|c| records(c, &RecordFilter::default(), 10))
            .unwrap();
        let ids: Vec<&str> = left.iter().filter_map(|r| r["id"].as_str()).collect();
        assert_eq!(ids, ["r4", "r3", "r2"], "newest first, the oldest purged");
        assert_eq!(
            j.read(|c| invocation(c, "a")).unwrap().unwrap()["result"],
            "result"
        );
        let purged = j
            .write_blocking(false, move |c| housekeeping_tx(c, 6000, keep))
            .unwrap();
        assert_eq!((purged.results, purged.events), (1, 1));
        assert!(j.read(|c| invocation(c, "a")).unwrap().is_none());
    }

    #[test]
    fn a_failed_write_is_rolled_back_alone_in_its_group() {
        let db = TempDb::new("group");
        let j = std::sync::Arc::new(Journal::open(&db).unwrap());
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let j = j.clone();
                std::thread::spawn(move || {
                    let ev = event(&format!("e{i}"), None, b"x");
                    j.write_blocking(true, move |c| {
                        accept_tx(c, &ev, 1000)?;
                        if i % 2 == 1 {
                            return Err(StoreError::Other("refused".into()));
                        }
                        Ok(())
                    })
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 16);
        let open = j.read(|c| Ok(open_events(c))).unwrap().unwrap();
        assert_eq!(open.len(), 16, "only the writes that succeeded were kept");
        assert!(open
            .iter()
            .all(|e| e.id[1..].parse::<u32>().unwrap() % 2 == 0));
    }

    #[test]
    fn a_schema_1_journal_migrates_keeping_its_events() {
        let db = TempDb::new("migrate");
        let path = db.to_path_buf();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            accept_tx(&conn, &event("e1", None, b"kept"), 1000).unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let version: i64 = j
            .read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(
            j.read(|c| event_bytes(c, "e1")).unwrap(),
            Some(b"kept".to_vec())
        );
        j.write_blocking(true, |c| put_schedule_tx(c, "s", "{}", 5))
            .unwrap();
        j.write_blocking(true, |c| schedule_fired_tx(c, "s", 5, 65, true))
            .unwrap();
        assert_eq!(
            j.read(schedules).unwrap(),
            vec![("s".to_string(), "{}".to_string(), 5, 65, 1)]
        );
    }

    #[test]
    fn a_rules_history_is_trimmed_to_its_newest_rows() {
        let db = TempDb::new("history");
        let j = Journal::open(&db).unwrap();
        j.write_blocking(false, |c| {
            for rule in ["a", "b"] {
                for n in 0..5 {
                    history_tx(
                        c,
                        &crate::metaevents::HistoryRow {
                            rule: rule.into(),
                            at_ms: n,
                            labels: json!({}),
                            transition: "pending",
                            value: Some(n as f64),
                            chain: vec![],
                            fired: false,
                            invocation_id: None,
                            detail: None,
                        },
                    )?;
                }
            }
            trim_history_tx(c, 3)
        })
        .unwrap();
        for rule in ["a", "b"] {
            let rows = j.read(|c| history(c, rule, None, 100)).unwrap();
            let at: Vec<i64> = rows.iter().map(|r| r["at_ms"].as_i64().unwrap()).collect();
            assert_eq!(at, vec![4, 3, 2], "{rule}: newest first, three kept");
        }
        j.write_blocking(true, |c| delete_metaevent_tx(c, "a"))
            .unwrap();
        assert!(j.read(|c| history(c, "a", None, 100)).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_or_newer_database_is_refused_naming_the_file() {
        let db = TempDb::new("corrupt");
        let path = db.to_path_buf();
        drop(Journal::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let e = Journal::open(&path).err().unwrap();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("newer"),
            "{e}"
        );
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let _ = std::fs::remove_file(path.with_extension("db-wal"));
        let e = Journal::open(&path).err().unwrap();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("To recover"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![0x5a; 8192],
            "left as it was"
        );
    }
}
