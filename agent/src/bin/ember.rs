//! `ember`: the command line for emberd.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use ember_vmm::api::client::{ApiClient, ApiResponse};

/// Talks to emberd: deploy and invoke functions, list and remove them,
/// look at instances.
#[derive(Debug, Parser)]
#[command(name = "ember", version)]
struct Cli {
    /// emberd's socket (default: $EMBER_SOCKET, else /run/ember/ember.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Deploy a new version of a function.
    Deploy {
        /// The function's name.
        name: String,
        /// The module (.wasm).
        module: PathBuf,
        /// Linear-memory limit, MiB.
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// Time limit: milliseconds, or with a unit (250ms, 30s, 2m).
        #[arg(long, value_name = "TIME", value_parser = parse_duration_ms)]
        timeout: Option<u64>,
        /// Environment variable (repeatable).
        #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// A file for /var/task (repeatable).
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<PathBuf>,
        /// Instances at most.
        #[arg(long, value_name = "N")]
        max_concurrency: Option<u32>,
        /// Idle instances kept at most this long, seconds.
        #[arg(long, value_name = "S")]
        keep_alive: Option<u64>,
        /// Restore instances ahead of predicted arrivals and keep idle
        /// ones as the host's policy says (auto), or keep each for the
        /// keep-alive only (off).
        #[arg(long, value_name = "auto|off", value_parser = ["auto", "off"])]
        prewarm: Option<String>,
        #[command(flatten)]
        async_config: AsyncConfig,
    },
    /// Invoke a function: the event from --data, --file or stdin.
    Invoke {
        /// The function's name.
        name: String,
        /// The event.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// The event, from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Route by this affinity key.
        #[arg(long)]
        affinity: Option<String>,
        /// Serve on this instance.
        #[arg(long, conflicts_with = "async")]
        instance: Option<String>,
        /// Invoke asynchronously: print the invocation's id once the event
        /// is on disk (follow it with `ember invocation ID`).
        #[arg(long = "async")]
        r#async: bool,
        /// With --async: a second invoke with this key (24 h) answers the
        /// first id instead of queueing the event again.
        #[arg(long, requires = "async", value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// An async invocation: its state, attempts, and result.
    Invocation {
        /// Its id.
        id: String,
    },
    /// The failure journal: async events that did not succeed, failed
    /// synchronous invocations (if configured), control actions.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Metaevents: rules over emberd's metadata that invoke a function.
    Metaevent {
        #[command(subcommand)]
        command: MetaeventCommand,
    },
    /// Schedules: a function invoked at a rate or on a cron expression.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// A metadata series, as a table (one column per label set).
    Metadata {
        /// The series (`ember metadata` without one lists them).
        series: Option<String>,
        /// One function's.
        #[arg(long)]
        function: Option<String>,
        /// The series' label (kind=trap, state=idle, stat=p99).
        #[arg(long, value_name = "K=V", value_parser = parse_env)]
        label: Option<(String, String)>,
        /// How far back: seconds, or 90s, 10m, 1h.
        #[arg(long, default_value = "5m")]
        since: String,
        /// Seconds per row.
        #[arg(long, default_value_t = 10)]
        step: u32,
    },
    /// List functions.
    Ls,
    /// Remove a function.
    Rm {
        /// The function's name.
        name: String,
    },
    /// List instances.
    Instances,
    /// emberd's health.
    Status,
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum MetaeventCommand {
    /// Add or replace a rule from a JSON file (docs/metaevents.md).
    Put {
        /// The rule's name.
        name: String,
        /// The rule (JSON; - for stdin).
        #[arg(long)]
        file: PathBuf,
    },
    /// List rules.
    Ls,
    /// A rule and its state per label set.
    Show {
        /// The rule's name.
        name: String,
    },
    /// A rule's transitions, newest first.
    History {
        /// The rule's name.
        name: String,
        /// Rows at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Remove a rule.
    Rm {
        /// The rule's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Add or replace a schedule.
    Put {
        /// The schedule's name.
        name: String,
        /// The function it invokes.
        #[arg(long)]
        function: String,
        /// A rate: "5 minutes", "1 hour", "30 seconds".
        #[arg(long, conflicts_with = "cron", required_unless_present = "cron")]
        rate: Option<String>,
        /// A 5-field cron expression: "*/5 * * * *".
        #[arg(long)]
        cron: Option<String>,
        /// The cron expression's IANA time zone.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// JSON passed as the events' payload.
        #[arg(long)]
        payload: Option<String>,
        /// Stored, not fired.
        #[arg(long)]
        disabled: bool,
        /// After a restart, do not fire the latest fire missed while emberd
        /// was down.
        #[arg(long)]
        no_catch_up: bool,
    },
    /// List schedules with their next fire.
    Ls,
    /// A schedule and its next fire times.
    Show {
        /// The schedule's name.
        name: String,
    },
    /// Remove a schedule.
    Rm {
        /// The schedule's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum JournalCommand {
    /// List records, newest first.
    Ls {
        #[command(flatten)]
        filter: JournalFilter,
        /// Records at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One record, with its attempts.
    Show {
        /// The record's id.
        id: String,
    },
    /// A record's event bytes, to stdout.
    Event {
        /// The record's id.
        id: String,
    },
    /// Replay a record (or, with --all, every record not yet replayed that
    /// matches the filters) as a new async invocation.
    Replay {
        /// The record's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every matching record not replayed yet.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: JournalFilter,
    },
    /// Delete a record.
    Rm {
        /// The record's id.
        id: String,
    },
}

/// A deploy's settings for async invocations (docs/journal.md).
#[derive(Debug, clap::Args)]
struct AsyncConfig {
    /// Async events open at most (more get a 429).
    #[arg(long, value_name = "N")]
    max_queued: Option<u64>,
    /// Retries of a failed async event (0-10).
    #[arg(long, value_name = "N")]
    max_retries: Option<u32>,
    /// The first retry's backoff ceiling (250ms, 30s, 2m), doubled per retry.
    #[arg(long, value_name = "TIME", value_parser = parse_duration_ms)]
    retry_base: Option<u64>,
    /// An async event older than this is not attempted again (60s to 360m).
    #[arg(long, value_name = "TIME", value_parser = parse_duration_ms)]
    max_event_age: Option<u64>,
    /// The function that gets a record of each event that finally failed.
    #[arg(long, value_name = "FUNCTION")]
    on_failure: Option<String>,
    /// The function that gets each detected error and control action.
    #[arg(long, value_name = "FUNCTION")]
    on_error: Option<String>,
    /// Journal failed synchronous invocations too.
    #[arg(long)]
    journal_sync_failures: bool,
}

impl AsyncConfig {
    /// Sets what was given into a deploy's `config`.
    fn apply(&self, config: &mut serde_json::Value) {
        if let Some(n) = self.max_queued {
            config["max_queued"] = n.into();
        }
        if let Some(n) = self.max_retries {
            config["max_retries"] = n.into();
        }
        if let Some(ms) = self.retry_base {
            config["retry_base_ms"] = ms.into();
        }
        if let Some(ms) = self.max_event_age {
            config["max_event_age_s"] = ms.div_ceil(1000).into();
        }
        if let Some(f) = &self.on_failure {
            config["on_failure"] = f.as_str().into();
        }
        if let Some(f) = &self.on_error {
            config["on_error"] = f.as_str().into();
        }
        if self.journal_sync_failures {
            config["journal_sync_failures"] = true.into();
        }
    }
}

#[derive(Debug, clap::Args)]
struct JournalFilter {
    /// Of this function.
    #[arg(long)]
    function: Option<String>,
    /// Of this kind (retries_exhausted, expired, function_deleted,
    /// invalid_event, interrupted, sync_failure, control_action).
    #[arg(long)]
    kind: Option<String>,
    /// Created within this long (250ms, 30s, 2m, or ms).
    #[arg(long, value_name = "TIME", value_parser = parse_duration_ms)]
    since: Option<u64>,
}

impl JournalFilter {
    fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(f) = &self.function {
            q.push(format!("function={}", encode(f)));
        }
        if let Some(k) = &self.kind {
            q.push(format!("kind={}", encode(k)));
        }
        if let Some(ago) = self.since {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            q.push(format!("since={}", now.saturating_sub(ago)));
        }
        q.join("&")
    }
}

/// Percent-encodes a query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn time_ms(v: &serde_json::Value) -> String {
    v.as_i64().map_or("-".into(), |ms| {
        let s = ms / 1000;
        let (h, m, sec) = ((s / 3600) % 24, (s / 60) % 60, s % 60);
        format!("{h:02}:{m:02}:{sec:02}.{:03}Z", ms % 1000)
    })
}

fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000)
    } else {
        (text, 1)
    };
    number
        .trim()
        .parse::<u64>()
        .map(|n| n * scale)
        .map_err(|_| format!("{text:?} is not a time: give milliseconds, or 250ms, 30s, 2m"))
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not K=V"))
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("ember: {e}");
        std::process::exit(1);
    }
}

fn socket(cli: &Cli) -> PathBuf {
    cli.socket
        .clone()
        .or_else(|| std::env::var_os("EMBER_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/ember/ember.sock"))
}

fn connect(cli: &Cli) -> Result<ApiClient, String> {
    let path = socket(cli);
    ApiClient::connect(&path).map_err(|e| {
        format!(
            "cannot reach emberd at {}: {e} (start emberd, or give --socket / EMBER_SOCKET)",
            path.display()
        )
    })
}

/// The error emberd answered, or the response.
fn ok(response: ApiResponse) -> Result<ApiResponse, String> {
    if (200..300).contains(&response.status) {
        return Ok(response);
    }
    let body = response.json();
    Err(match body["error"]["message"].as_str() {
        Some(message) => format!(
            "{} ({})",
            message,
            body["error"]["kind"].as_str().unwrap_or("?")
        ),
        None => format!("emberd answered {}", response.status),
    })
}

/// `GET path`, as JSON (an error answer becomes the error).
fn get_json(cli: &Cli, path: &str) -> Result<serde_json::Value, String> {
    let response = connect(cli)?.get(path).map_err(|e| e.to_string())?;
    Ok(ok(response)?.json())
}

fn run(cli: Cli) -> Result<(), String> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "ember", &mut std::io::stdout());
            Ok(())
        }
        Command::Deploy {
            name,
            module,
            memory,
            timeout,
            env,
            files,
            max_concurrency,
            keep_alive,
            prewarm,
            async_config,
        } => {
            let mut config = serde_json::json!({});
            async_config.apply(&mut config);
            if let Some(m) = memory {
                config["memory_mib"] = (*m).into();
            }
            if let Some(t) = timeout {
                config["timeout_ms"] = (*t).into();
            }
            if let Some(n) = max_concurrency {
                config["max_concurrency"] = (*n).into();
            }
            if let Some(k) = keep_alive {
                config["keep_alive_s"] = (*k).into();
            }
            if let Some(p) = prewarm {
                config["prewarm"] = p.as_str().into();
            }
            if !env.is_empty() {
                config["env"] = env
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let mut bundle = Vec::new();
            for file in files {
                let file_name = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| format!("{} has no usable file name", file.display()))?;
                bundle.push((file_name.to_string(), read(file)?));
            }
            let module = read(module)?;
            let mut client = connect(&cli)?;
            eprintln!("deploying {name}: storing, restoring the base, loading the module, snapshotting the template...");
            let response =
                ember_agent::client::deploy(&mut client, name, &config, &module, &bundle)
                    .map_err(|e| e.to_string())?;
            let deployed = ok(response)?.json();
            if cli.json {
                println!("{deployed}");
            } else {
                for stage in deployed["stages"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<36} {:>8.1} ms",
                        stage["stage"].as_str().unwrap_or("?"),
                        stage["us"].as_f64().unwrap_or(0.0) / 1000.0
                    );
                }
                println!(
                    "{} version {} ready ({} model) in {:.1} ms",
                    name,
                    deployed["version"],
                    deployed["function"]["model"].as_str().unwrap_or("?"),
                    deployed["total_us"].as_f64().unwrap_or(0.0) / 1000.0
                );
            }
            Ok(())
        }
        Command::Invoke {
            name,
            data,
            file,
            affinity,
            instance,
            r#async,
            idempotency_key,
        } => {
            let event = match (data, file) {
                (Some(d), _) => d.clone().into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
                }
                (None, None) => {
                    let mut buf = Vec::new();
                    if !std::io::stdin().is_terminal() {
                        std::io::stdin()
                            .read_to_end(&mut buf)
                            .map_err(|e| e.to_string())?;
                    }
                    buf
                }
            };
            let mut headers = Vec::new();
            if let Some(a) = affinity {
                headers.push(("X-Ember-Affinity", a.as_str()));
            }
            if let Some(i) = instance {
                headers.push(("X-Ember-Instance", i.as_str()));
            }
            if *r#async {
                headers.push(("X-Ember-Invocation-Type", "Event"));
            }
            if let Some(k) = idempotency_key {
                headers.push(("X-Ember-Idempotency-Key", k.as_str()));
            }
            let mut client = connect(&cli)?;
            let response = client
                .request_with_headers(
                    "POST",
                    &format!("/functions/{name}/invoke"),
                    &headers,
                    Some(&event),
                )
                .map_err(|e| e.to_string())?;
            let response = ok(response)?;
            if *r#async {
                let id = response.json()["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({ "id": id, "new": response.status == 202 })
                    );
                } else {
                    println!("{id}");
                }
                return Ok(());
            }
            let h = |n: &str| response.header(n).unwrap_or("").to_string();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "result": String::from_utf8_lossy(&response.body),
                        "instance": h("x-ember-instance"),
                        "start": h("x-ember-start"),
                        "version": h("x-ember-version"),
                        "affinity": h("x-ember-affinity"),
                        "duration_us": h("x-ember-duration-us"),
                        "error": h("x-ember-function-error"),
                        "invocation_id": h("x-ember-invocation-id"),
                    })
                );
            } else {
                std::io::stdout()
                    .write_all(&response.body)
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "[{} {} v{}{}, {} us in the function{}; invocation {}]",
                    h("x-ember-instance"),
                    h("x-ember-start"),
                    h("x-ember-version"),
                    if h("x-ember-affinity").is_empty() {
                        String::new()
                    } else {
                        format!(", affinity {}", h("x-ember-affinity"))
                    },
                    h("x-ember-duration-us"),
                    if h("x-ember-function-error").is_empty() {
                        String::new()
                    } else {
                        format!(", function error: {}", h("x-ember-function-error"))
                    },
                    h("x-ember-invocation-id"),
                );
            }
            if !h("x-ember-function-error").is_empty() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Ls => {
            let list = get_json(&cli, "/functions")?;
            if cli.json {
                println!("{list}");
            } else {
                println!(
                    "{:<24} {:>7} {:>9} {:>10} {:>10}",
                    "NAME", "VERSION", "MEMORY", "TIMEOUT", "MODULE"
                );
                for f in list.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:>7} {:>9} {:>8}ms {:>9}K",
                        f["name"].as_str().unwrap_or("?"),
                        f["version"].to_string(),
                        f["config"]["memory_mib"]
                            .as_u64()
                            .map_or("auto".into(), |m| format!("{m}MiB")),
                        f["config"]["timeout_ms"].to_string(),
                        f["module_bytes"].as_u64().unwrap_or(0) / 1024
                    );
                }
            }
            Ok(())
        }
        Command::Rm { name } => {
            let response = connect(&cli)?
                .request("DELETE", &format!("/functions/{name}"), None)
                .map_err(|e| e.to_string())?;
            ok(response)?;
            if !cli.json {
                println!("{name} removed");
            }
            Ok(())
        }
        Command::Instances => {
            let list = get_json(&cli, "/instances")?;
            if cli.json {
                println!("{list}");
            } else {
                println!(
                    "{:<24} {:<16} {:>7} {:<9} {:<6} {:>11} {:>7} KEYS",
                    "ID", "FUNCTION", "VERSION", "STATE", "VMM", "INVOCATIONS", "IDLE_S"
                );
                for i in list.as_array().into_iter().flatten() {
                    let keys: Vec<&str> = i["affinity_keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str())
                        .collect();
                    println!(
                        "{:<24} {:<16} {:>7} {:<9} {:<6} {:>11} {:>7} {}",
                        i["id"].as_str().unwrap_or("?"),
                        i["function"].as_str().unwrap_or("?"),
                        i["version"].to_string(),
                        i["state"].as_str().unwrap_or("?"),
                        i["vmm"].as_str().unwrap_or("-"),
                        i["invocations"].to_string(),
                        i["idle_s"].to_string(),
                        keys.join(",")
                    );
                }
            }
            Ok(())
        }
        Command::Invocation { id } => {
            let v = get_json(&cli, &format!("/invocations/{}", encode(id)))?;
            if cli.json {
                println!("{v}");
                return Ok(());
            }
            println!(
                "{} {} {}",
                v["id"].as_str().unwrap_or("?"),
                v["function"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?")
            );
            for a in v["attempts"].as_array().into_iter().flatten() {
                println!(
                    "  attempt {} {} {} {} {} {}",
                    a["n"],
                    time_ms(&a["started_ms"]),
                    a["outcome"].as_str().unwrap_or("?"),
                    a["instance"].as_str().unwrap_or("-"),
                    a["start"].as_str().unwrap_or("-"),
                    a["error"]["kind"].as_str().unwrap_or(""),
                );
            }
            if let Some(j) = v["journal_id"].as_str() {
                println!(
                    "  journal record {j}: {}",
                    v["error"]["message"].as_str().unwrap_or("")
                );
            }
            if let Some(result) = v["result"].as_str() {
                println!("{result}");
            }
            Ok(())
        }
        Command::Journal { command } => journal(&cli, command),
        Command::Metaevent { command } => metaevent(&cli, command),
        Command::Schedule { command } => schedule(&cli, command),
        Command::Metadata {
            series,
            function,
            label,
            since,
            step,
        } => metadata(
            &cli,
            series.as_deref(),
            function.as_deref(),
            label,
            since,
            *step,
        ),
        Command::Status => {
            let health = get_json(&cli, "/health")?;
            if cli.json {
                println!("{health}");
            } else {
                for (k, v) in health.as_object().into_iter().flatten() {
                    println!("{k:<16} {v}");
                }
            }
            Ok(())
        }
    }
}

/// `method path` with a JSON body; the answer's JSON.
fn send_json(
    cli: &Cli,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<serde_json::Value, String> {
    let response = connect(cli)?
        .request(method, path, body)
        .map_err(|e| e.to_string())?;
    let response = ok(response)?;
    Ok(if response.body.is_empty() {
        serde_json::Value::Null
    } else {
        response.json()
    })
}

fn print_pretty(cli: &Cli, v: &serde_json::Value) {
    if cli.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn metaevent(cli: &Cli, command: &MetaeventCommand) -> Result<(), String> {
    match command {
        MetaeventCommand::Put { name, file } => {
            let body = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut b)
                    .map_err(|e| e.to_string())?;
                b
            } else {
                std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?
            };
            let rule = send_json(
                cli,
                "PUT",
                &format!("/metaevents/{}", encode(name)),
                Some(&body),
            )?;
            print_pretty(cli, &rule);
            Ok(())
        }
        MetaeventCommand::Ls => {
            let list = get_json(cli, "/metaevents")?;
            if cli.json {
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:<20} {:<38} {:<16} {:>7} {:>7}",
                "NAME", "CONDITION", "TARGET", "PENDING", "FIRING"
            );
            for r in list["metaevents"].as_array().into_iter().flatten() {
                let labels: Vec<String> = r["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                    .collect();
                let condition = format!(
                    "{}({}{{{}}}, {}s) {} {}",
                    r["aggregate"].as_str().unwrap_or("?"),
                    r["series"].as_str().unwrap_or("?"),
                    labels.join(","),
                    r["window_s"],
                    r["op"].as_str().unwrap_or("?"),
                    r["threshold"]
                        .as_f64()
                        .map_or("?".into(), |t| format!("{t}"))
                );
                println!(
                    "{:<20} {:<38} {:<16} {:>7} {:>7}",
                    r["name"].as_str().unwrap_or("?"),
                    condition,
                    r["target"].as_str().unwrap_or("?"),
                    r["pending"].to_string(),
                    r["firing"].to_string()
                );
            }
            Ok(())
        }
        MetaeventCommand::Show { name } => {
            print_pretty(
                cli,
                &get_json(cli, &format!("/metaevents/{}", encode(name)))?,
            );
            Ok(())
        }
        MetaeventCommand::History { name, limit } => {
            let h = get_json(
                cli,
                &format!("/metaevents/{}/history?limit={limit}", encode(name)),
            )?;
            if cli.json {
                println!("{h}");
                return Ok(());
            }
            println!(
                "{:<13} {:<9} {:<5} {:<24} {:>10}  {:<32} DETAIL",
                "AT", "STATE", "FIRED", "LABELS", "VALUE", "INVOCATION"
            );
            for r in h["history"].as_array().into_iter().flatten() {
                let labels: Vec<String> = r["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                    .collect();
                let chain: Vec<&str> = r["chain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.as_str())
                    .collect();
                let detail = match (r["detail"].as_str(), chain.is_empty()) {
                    (Some(d), _) => d.to_string(),
                    (None, false) => format!("chain {}", chain.join(" → ")),
                    (None, true) => String::new(),
                };
                println!(
                    "{:<13} {:<9} {:<5} {:<24} {:>10}  {:<32} {}",
                    time_ms(&r["at_ms"]),
                    r["transition"].as_str().unwrap_or("?"),
                    if r["fired"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    labels.join(","),
                    r["value"].as_f64().map_or("-".into(), |v| format!("{v}")),
                    r["invocation_id"].as_str().unwrap_or("-"),
                    detail
                );
            }
            Ok(())
        }
        MetaeventCommand::Rm { name } => {
            send_json(
                cli,
                "DELETE",
                &format!("/metaevents/{}", encode(name)),
                None,
            )?;
            if !cli.json {
                println!("{name} removed");
            }
            Ok(())
        }
    }
}

fn schedule(cli: &Cli, command: &ScheduleCommand) -> Result<(), String> {
    match command {
        ScheduleCommand::Put {
            name,
            function,
            rate,
            cron,
            timezone,
            payload,
            disabled,
            no_catch_up,
        } => {
            let payload: serde_json::Value = match payload {
                Some(p) => {
                    serde_json::from_str(p).map_err(|e| format!("--payload is not JSON: {e}"))?
                }
                None => serde_json::Value::Null,
            };
            let body = serde_json::json!({
                "function": function,
                "rate": rate,
                "cron": cron,
                "timezone": timezone,
                "payload": payload,
                "enabled": !disabled,
                "catch_up": !no_catch_up,
            });
            let s = send_json(
                cli,
                "PUT",
                &format!("/schedules/{}", encode(name)),
                Some(body.to_string().as_bytes()),
            )?;
            print_pretty(cli, &s);
            Ok(())
        }
        ScheduleCommand::Ls => {
            let list = get_json(cli, "/schedules")?;
            if cli.json {
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:<20} {:<16} {:<20} {:<8} {:>6} NEXT",
                "NAME", "FUNCTION", "WHEN", "ENABLED", "FIRES"
            );
            for s in list["schedules"].as_array().into_iter().flatten() {
                let when = s["rate"].as_str().or(s["cron"].as_str()).unwrap_or("?");
                println!(
                    "{:<20} {:<16} {:<20} {:<8} {:>6} {}",
                    s["name"].as_str().unwrap_or("?"),
                    s["function"].as_str().unwrap_or("?"),
                    when,
                    s["enabled"].to_string(),
                    s["fires"].to_string(),
                    s["next"][0].as_str().unwrap_or("-")
                );
            }
            Ok(())
        }
        ScheduleCommand::Show { name } => {
            print_pretty(
                cli,
                &get_json(cli, &format!("/schedules/{}", encode(name)))?,
            );
            Ok(())
        }
        ScheduleCommand::Rm { name } => {
            send_json(cli, "DELETE", &format!("/schedules/{}", encode(name)), None)?;
            if !cli.json {
                println!("{name} removed");
            }
            Ok(())
        }
    }
}

fn metadata(
    cli: &Cli,
    series: Option<&str>,
    function: Option<&str>,
    label: &Option<(String, String)>,
    since: &str,
    step: u32,
) -> Result<(), String> {
    let Some(series) = series else {
        let catalog = get_json(cli, "/metadata")?;
        if cli.json {
            println!("{catalog}");
            return Ok(());
        }
        println!("{:<24} {:<9} {:<26} HELP", "SERIES", "SCOPE", "LABEL");
        for s in catalog["series"].as_array().into_iter().flatten() {
            let label = match s["label"].as_object() {
                Some(l) => {
                    let values: Vec<&str> = l["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str())
                        .collect();
                    format!(
                        "{}={}",
                        l["name"].as_str().unwrap_or("?"),
                        if values.is_empty() {
                            "…".into()
                        } else {
                            values.join("|")
                        }
                    )
                }
                None => "-".into(),
            };
            println!(
                "{:<24} {:<9} {:<26} {}",
                s["series"].as_str().unwrap_or("?"),
                s["scope"].as_str().unwrap_or("?"),
                label,
                s["help"].as_str().unwrap_or("")
            );
        }
        return Ok(());
    };
    let mut query = format!(
        "series={}&since={}&step={step}",
        encode(series),
        encode(since)
    );
    if let Some(f) = function {
        query.push_str(&format!("&function={}", encode(f)));
    }
    if let Some((k, v)) = label {
        query.push_str(&format!("&{}={}", encode(k), encode(v)));
    }
    let data = get_json(cli, &format!("/metadata?{query}"))?;
    if cli.json {
        println!("{data}");
        return Ok(());
    }
    let results = data["results"].as_array().cloned().unwrap_or_default();
    if results.is_empty() {
        println!("no data for {series} in the last {since}");
        return Ok(());
    }
    let columns: Vec<String> = results
        .iter()
        .map(|r| {
            let labels: Vec<String> = r["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, v)| v.as_str().unwrap_or("?").to_string())
                .collect();
            if labels.is_empty() {
                series.to_string()
            } else {
                labels.join("/")
            }
        })
        .collect();
    let width = columns.iter().map(String::len).max().unwrap_or(8).max(8);
    print!("{:<13}", "TIME");
    for c in &columns {
        print!(" {c:>width$}");
    }
    println!();
    let rows = results[0]["points"].as_array().map_or(0, Vec::len);
    for i in 0..rows {
        let t = results[0]["points"][i][0].as_i64().unwrap_or(0) * 1000;
        print!("{:<13}", time_ms(&serde_json::json!(t)));
        for r in &results {
            let v = &r["points"][i][1];
            let text = v.as_f64().map_or("-".into(), |x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.2}")
                }
            });
            print!(" {text:>width$}");
        }
        println!();
    }
    Ok(())
}

fn journal(cli: &Cli, command: &JournalCommand) -> Result<(), String> {
    match command {
        JournalCommand::Ls { filter, limit } => {
            let mut q = filter.query();
            if !q.is_empty() {
                q.push('&');
            }
            let list = get_json(cli, &format!("/journal?{q}limit={limit}"))?;
            if cli.json {
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:<32} {:<13} {:<17} {:<16} {:>7} {:>8} REPLAYED",
                "ID", "CREATED", "KIND", "FUNCTION", "VERSION", "ATTEMPTS"
            );
            for r in list["records"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:<13} {:<17} {:<16} {:>7} {:>8} {}",
                    r["id"].as_str().unwrap_or("?"),
                    time_ms(&r["created_ms"]),
                    r["kind"].as_str().unwrap_or("?"),
                    r["function"].as_str().unwrap_or("?"),
                    r["version"].to_string(),
                    r["attempts"].as_array().map_or(0, Vec::len),
                    r["replayed_as"].as_str().unwrap_or("-"),
                );
            }
            Ok(())
        }
        JournalCommand::Show { id } => {
            let r = get_json(cli, &format!("/journal/{}", encode(id)))?;
            if cli.json {
                println!("{r}");
            } else {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            }
            Ok(())
        }
        JournalCommand::Event { id } => {
            let response = connect(cli)?
                .get(&format!("/journal/{}/event", encode(id)))
                .map_err(|e| e.to_string())?;
            let response = ok(response)?;
            std::io::stdout()
                .write_all(&response.body)
                .map_err(|e| e.to_string())
        }
        JournalCommand::Replay { id, all, filter } => {
            let path = match id {
                Some(id) if !*all => format!("/journal/{}/replay", encode(id)),
                _ => format!("/journal/replay?{}", filter.query()),
            };
            let response = connect(cli)?
                .request("POST", &path, None)
                .map_err(|e| e.to_string())?;
            let body = ok(response)?.json();
            if cli.json {
                println!("{body}");
            } else if let Some(id) = body["id"].as_str() {
                println!("{id}");
            } else {
                println!(
                    "{} queued, {} skipped (no event, or their function is gone, or no room)",
                    body["queued"], body["skipped"]
                );
            }
            Ok(())
        }
        JournalCommand::Rm { id } => {
            let response = connect(cli)?
                .request("DELETE", &format!("/journal/{}", encode(id)), None)
                .map_err(|e| e.to_string())?;
            ok(response)?;
            if !cli.json {
                println!("{id} removed");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the definition (names that conflicts_with and
    /// requires refer to exist, and so on).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
