//! The slot runner, compiled: one long-lived process per slot, inside the slot's sandbox, with
//! the protocol, behaviour and messages of the Python runner (atropos.sandbox.runner, whose
//! modules each of ours names as its twin). Requests are JSON lines on stdin, answers JSON lines
//! on stdout; each request runs on a thread of its own, so `reset` can cut a running command
//! short. No interpreter to start: the server picks this runner where it was built and installed
//! (`--runner`, atropos.sandbox.server.isolation).

mod bridge;
mod capture;
mod cgjoin;
mod children;
mod files;
mod hibernate;
mod limits;
mod oneshot;
mod outcome;
mod pathsafe;
mod procs;
mod session;
mod slotnet;
mod sys;

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use capture::Emit;
use limits::{limit_of_result, LimitWatch, RunnerLimits};
use outcome::{add_note, stopped_by, Outcome};
use session::{Session, SessionFds};

/// below the server: a slot full of busy commands must not starve the server's control plane
const NICENESS: i32 = 5;
const FREEING_ATTEMPTS: usize = 40;
const DEFAULT_TIMEOUT: f64 = 60.0;

static OUT: Mutex<()> = Mutex::new(());

/// One JSON line to the server; lines never interleave.
fn reply(msg: &Value) {
    let mut line = msg.to_string().into_bytes();
    line.push(b'\n');
    let _guard = OUT.lock().unwrap_or_else(|e| e.into_inner());
    if sys::write_all(1, &line).is_err() {
        std::process::exit(0); // the server is gone
    }
}

/// A failed request as Python's runner words it (`ExcType: message`).
struct Failure(String);

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => {
                // SAFETY: strerror returns a NUL-terminated string
                let text = unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno)) }
                    .to_string_lossy()
                    .into_owned();
                Failure(format!("OSError: [Errno {errno}] {text}"))
            }
            None => Failure(format!("OSError: {e}")),
        }
    }
}

fn field<'a>(req: &'a Map<String, Value>, name: &str) -> Result<&'a Value, Failure> {
    req.get(name).ok_or_else(|| Failure(format!("KeyError: '{name}'")))
}

fn text<'a>(req: &'a Map<String, Value>, name: &str) -> Result<&'a str, Failure> {
    field(req, name)?
        .as_str()
        .ok_or_else(|| Failure(format!("TypeError: '{name}' must be a string")))
}

struct Runner {
    root: String,
    cap: usize,
    file_limit: u64,
    limits: RunnerLimits,
    prelude: String,
    session: Session,
    watch: Arc<LimitWatch>,
    inflight: AtomicUsize,
}

impl Runner {
    /// Answer one request, which the reading loop counted in `inflight`.
    fn answer(&self, req: Map<String, Value>, rid: Value) {
        let op = req.get("op").and_then(Value::as_str).unwrap_or("");
        let streamed =
            matches!(op, "bash" | "bash_session") && req.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let emit: Option<Emit> = streamed.then(|| {
            let rid = rid.clone();
            Arc::new(move |stream: &str, data: &str| {
                reply(&json!({"id": rid, "chunk": {"stream": stream, "data": data}}))
            }) as Emit
        });
        let answer = match self.watched(&req, op, emit.as_ref()) {
            Ok(result) => json!({"id": rid, "result": result}),
            Err(Failure(error)) => json!({"id": rid, "error": error}),
        };
        // done before the answer goes out: a hibernation the server asks for once it has the
        // answer must not find this request still counted
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        reply(&answer);
    }

    /// Run the request while the limit watch looks on; a command's outcome then says what limit
    /// stopped it, or stopped its background processes since the last call.
    fn watched(&self, req: &Map<String, Value>, op: &str, emit: Option<&Emit>) -> Result<Value, Failure> {
        let trips = self.watch.enter();
        let result = match op {
            "bash" | "bash_session" => self.command_or_free(req, op, emit),
            _ => self.dispatch(req, op),
        };
        let tripped = self.watch.leave(trips);
        let mut outcome = match (op, result?) {
            ("bash" | "bash_session", Value::Object(outcome)) => outcome,
            (_, other) => return Ok(other),
        };
        let ok = outcome.get("ok").and_then(Value::as_bool).unwrap_or(false);
        let code = outcome.get("exit_code").and_then(Value::as_i64);
        let stderr = outcome.get("stderr").and_then(Value::as_str).unwrap_or("");
        if let Some(kind) = tripped.or_else(|| limit_of_result(ok, code, stderr)) {
            stopped_by(&mut outcome, kind, &self.limits.describe(kind));
        }
        self.note_background_trip(&mut outcome);
        Ok(Value::Object(outcome))
    }

    /// Background processes killed between calls: the agent learns it from its next command.
    fn note_background_trip(&self, outcome: &mut Outcome) {
        let Some(kind) = self.watch.take_unreported() else {
            return;
        };
        add_note(
            outcome,
            &format!(
                "background processes of this slot were killed: {}",
                self.limits.describe(&kind)
            ),
        );
        if outcome.get("limit").is_none_or(Value::is_null) {
            outcome.insert("limit".into(), kind.into());
        }
    }

    fn dispatch(&self, req: &Map<String, Value>, op: &str) -> Result<Value, Failure> {
        let base64 = || req.get("encoding").and_then(Value::as_str) == Some("base64");
        match op {
            "read_file" => {
                let max_bytes = req.get("max_bytes").and_then(Value::as_u64);
                Ok(files::read_file(&self.root, text(req, "path")?, base64(), max_bytes, self.file_limit).into())
            }
            "write_file" => {
                let mode = req.get("mode").and_then(Value::as_u64).map(|m| m as u32);
                let written = files::write_file(
                    &self.root,
                    text(req, "path")?,
                    text(req, "content")?,
                    base64(),
                    mode,
                    self.file_limit,
                );
                Ok(written.into())
            }
            "reset" => self.reset(),
            "listen" => {
                let port = field(req, "port")?.as_u64().unwrap_or(0) as u16;
                let port = bridge::listen_and_hand_over(port, text(req, "channel")?)?;
                Ok(json!({"ok": true, "port": port}))
            }
            "ping" => Ok(json!({"ok": true, "pid": procs::own_pid()})),
            other => Err(Failure(format!("ValueError: unknown op {other:?}"))),
        }
    }

    fn command_or_free(&self, req: &Map<String, Value>, op: &str, emit: Option<&Emit>) -> Result<Value, Failure> {
        match self.command(req, op, emit) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.command_after_freeing_processes(req, op, emit),
            Err(e) => Err(e.into()),
            Ok(outcome) => Ok(Value::Object(outcome)),
        }
    }

    /// Fork refused: background processes fill the slot's process limit. They are killed (the
    /// result says so) and the command starts once their count has dropped.
    fn command_after_freeing_processes(
        &self,
        req: &Map<String, Value>,
        op: &str,
        emit: Option<&Emit>,
    ) -> Result<Value, Failure> {
        self.watch.state.lock().unwrap_or_else(|e| e.into_inner()).unreported = Some("processes".into());
        procs::kill_tree(procs::own_pid(), false);
        for _ in 0..FREEING_ATTEMPTS {
            children::reap(); // killed orphans count until reaped
            match self.command(req, op, emit) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e.into()),
                Ok(outcome) => return Ok(Value::Object(outcome)),
            }
        }
        Ok(json!({
            "ok": false,
            "error": "cannot start the command: the slot is at its process limit",
            "limit": "processes",
            "duration_ms": 0.0,
        }))
    }

    fn command(&self, req: &Map<String, Value>, op: &str, emit: Option<&Emit>) -> std::io::Result<Outcome> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
        let command = req
            .get("command")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("'command' must be a string"))?;
        let timeout = req
            .get("timeout")
            .and_then(Value::as_f64)
            .filter(|t| *t > 0.0)
            .unwrap_or(DEFAULT_TIMEOUT);
        let timeout = Duration::from_secs_f64(timeout.min(1e9));
        let cwd = req.get("cwd").and_then(Value::as_str);
        let env: Vec<(String, String)> = match req.get("env") {
            Some(Value::Object(vars)) => vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect(),
            _ => Vec::new(),
        };
        let session = op == "bash_session";
        let placed = outcome::placed_command(command, cwd, &env, &self.root, session);
        if !session {
            return oneshot::run_oneshot(&self.prelude, &placed, timeout, self.cap, emit);
        }
        let read_background = req.get("read_background").and_then(Value::as_bool).unwrap_or(false);
        self.session.run(&placed, timeout, self.cap, emit, read_background)
    }

    fn reset(&self) -> Result<Value, Failure> {
        let started = std::time::Instant::now();
        // every process of the slot first, the session's shell among them: a session command that
        // runs holds the session until its shell is gone
        let mut killed = procs::kill_tree(procs::own_pid(), false);
        killed += self.session.close();
        children::reap();
        files::empty_dir(&self.root)?;
        Ok(json!({"ok": true, "killed": killed, "duration_ms": outcome::elapsed_ms(started)}))
    }

    /// Sleep as a holder process if nothing but the idle session shell lives in the slot; the
    /// answer goes out first, and nothing runs between it and the exec.
    fn hibernate(&self, rid: Value) {
        let busy = self.inflight.load(Ordering::SeqCst) > 0;
        let why = if busy {
            Some("another request is in flight".to_string())
        } else {
            hibernate::why_not(self.session.shell_pid())
        };
        if let Some(why) = why {
            reply(&json!({"id": rid, "result": {"ok": false, "why": why}}));
            return;
        }
        let (unreported, last_size) = {
            let state = self.watch.state.lock().unwrap_or_else(|e| e.into_inner());
            (state.unreported.clone(), state.last_size)
        };
        let error = self.session.for_hibernation(|session, session_lost, background| {
            let held = hibernate::Held {
                session,
                session_lost,
                background,
                unreported,
                last_size,
            };
            reply(&json!({"id": rid, "result": {"ok": true}}));
            hibernate::hold(held)
        });
        // the server already counts us asleep: end, and the slot restarts
        eprintln!("runner: cannot hibernate: {error}");
        std::process::exit(70);
    }

    fn resume(&self, state: &Value) -> std::io::Result<()> {
        let int = |v: &Value| v.as_i64().unwrap_or(-1);
        let session = match &state["session"] {
            Value::Object(s) => Some(SessionFds {
                pid: int(&s["pid"]) as i32,
                stdout: int(&s["stdout"]) as i32,
                stderr: int(&s["stderr"]) as i32,
                control: int(&s["control"]) as i32,
            }),
            _ => None,
        };
        let background = hibernate::unstash(int(&state["background"]) as i32);
        let dropped = state["dropped"].as_u64().unwrap_or(0);
        self.session.resume(
            session,
            state["session_lost"].as_bool().unwrap_or(false),
            &background,
            dropped,
        )?;
        let mut watch = self.watch.state.lock().unwrap_or_else(|e| e.into_inner());
        watch.unreported = state["unreported"].as_str().map(String::from);
        watch.last_size = state["last_size"].as_u64().unwrap_or(0);
        Ok(())
    }

    /// Every process of the slot killed, then the runner ends (a session command that runs holds
    /// the session, so its shell is killed with the rest, not closed).
    fn shutdown(&self) -> ! {
        procs::kill_tree(procs::own_pid(), false);
        std::process::exit(0);
    }
}

const VALUE_OPTIONS: [&str; 9] = [
    "--root",
    "--max-output",
    "--max-file-bytes",
    "--limit-memory",
    "--limit-file-size",
    "--limit-cpu",
    "--limit-workspace",
    "--limit-processes",
    hibernate::RESUME_FLAG,
];
const FLAGS: [&str; 2] = ["--nproc-rlimit", "--pid-namespace"];

fn parse_args(argv: &[String]) -> Result<std::collections::HashMap<String, String>, String> {
    let mut opts = std::collections::HashMap::new();
    opts.insert("--max-output".to_string(), (1u64 << 20).to_string());
    opts.insert("--max-file-bytes".to_string(), (16u64 << 20).to_string());
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if FLAGS.contains(&flag.as_str()) {
            opts.insert(flag.clone(), "1".into());
        } else if VALUE_OPTIONS.contains(&flag.as_str()) {
            opts.insert(flag.clone(), it.next().cloned().unwrap_or_default());
        } else {
            return Err(format!("runner: unknown option {flag}"));
        }
    }
    if opts.get("--root").is_none_or(String::is_empty) {
        return Err("runner: --root is required".into());
    }
    Ok(opts)
}

fn number(opts: &std::collections::HashMap<String, String>, flag: &str) -> Result<Option<u64>, String> {
    match opts.get(flag).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("runner: {flag} takes a number, not {v:?}")),
    }
}

/// SIGCHLD and SIGTERM, blocked in every thread (set before any starts) and taken here.
fn signal_thread(runner: Arc<Runner>, signals: libc::sigset_t) {
    loop {
        let mut sig = 0;
        // SAFETY: sigwait with a valid set (blocked in all threads) and out pointer
        if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGTERM {
            runner.shutdown();
        }
        children::reap();
    }
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) {
    // SAFETY: prctl with integer arguments
    unsafe { libc::prctl(option, arg, 0, 0, 0) };
}

fn run() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let opts = parse_args(&argv)?;
    let limits = RunnerLimits {
        memory: number(&opts, "--limit-memory")?,
        file_size: number(&opts, "--limit-file-size")?,
        cpu_seconds: number(&opts, "--limit-cpu")?,
        workspace: number(&opts, "--limit-workspace")?,
        processes: number(&opts, "--limit-processes")?,
        nproc_rlimit: opts.contains_key("--nproc-rlimit"),
    };
    limits.apply_to_self();
    prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    // no process of the slot (all run as our user) may open our fds through /proc, ptrace us or read
    // our memory: our pipes to the server carry every call's request and answer. Commands we start
    // are dumpable again (exec resets it), which is their business
    prctl(libc::PR_SET_DUMPABLE, 0);
    prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
    let resume: Option<Value> = match opts.get(hibernate::RESUME_FLAG) {
        Some(state) => Some(serde_json::from_str(state).map_err(|e| format!("runner: bad resume state: {e}"))?),
        None => None,
    };
    if resume.is_none() {
        // SAFETY: nice with an integer (a resumed runner is the same process, already niced)
        unsafe { libc::nice(NICENESS) };
    }
    let root = opts["--root"].clone();
    std::env::set_current_dir(&root).map_err(|e| format!("runner: cannot enter {root}: {e}"))?;
    let signals = {
        // SAFETY: a sigset built by sigemptyset/sigaddset, then blocked for this thread and every
        // thread it starts
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        }
    };
    let prelude = limits.shell_prelude();
    let watch = LimitWatch::new(&root, &limits, opts.contains_key("--pid-namespace"));
    let runner = Arc::new(Runner {
        cap: number(&opts, "--max-output")?.unwrap_or(1 << 20) as usize,
        file_limit: number(&opts, "--max-file-bytes")?.unwrap_or(16 << 20),
        root,
        limits,
        session: Session::new(prelude.clone()),
        prelude,
        watch: watch.clone(),
        inflight: AtomicUsize::new(0),
    });
    {
        let runner = runner.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_thread(runner, signals))
            .map_err(|e| format!("runner: cannot start: {e}"))?;
    }
    if let Some(state) = &resume {
        runner
            .resume(state)
            .map_err(|e| format!("runner: cannot resume: {e}"))?;
    }
    watch.start();
    reply(&json!({"id": 0, "result": {"ok": true, "ready": true, "pid": procs::own_pid()}}));
    serve(&runner);
    runner.shutdown();
}

fn request_id(line: &[u8]) -> Value {
    // a line that is not JSON still answers its request where the id can be read (the server
    // writes it first), so no call waits forever
    let text = String::from_utf8_lossy(line);
    let digits: String = text
        .trim_start()
        .strip_prefix("{\"id\":")
        .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect())
        .unwrap_or_default();
    digits.parse::<u64>().map(Value::from).unwrap_or(Value::Null)
}

fn serve(runner: &Arc<Runner>) {
    let mut input = BufReader::with_capacity(1 << 16, std::io::stdin().lock());
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return, // the server is gone
            Ok(_) => {}
        }
        let mut req: Map<String, Value> = match serde_json::from_slice(&line) {
            Ok(Value::Object(req)) => req,
            Ok(_) => Map::new(),
            Err(e) => {
                reply(&json!({"id": request_id(&line), "error": format!("malformed request: {e}")}));
                continue;
            }
        };
        let rid = req.remove("id").unwrap_or(Value::Null);
        if req.get("op").and_then(Value::as_str) == Some("hibernate") {
            runner.hibernate(rid); // returns only when the runner stays awake
            continue;
        }
        runner.inflight.fetch_add(1, Ordering::SeqCst);
        let worker = runner.clone();
        let handled = Arc::new(Mutex::new(Some((req, rid))));
        let taken = handled.clone();
        let spawned = std::thread::Builder::new().spawn(move || {
            if let Some((req, rid)) = taken.lock().unwrap_or_else(|e| e.into_inner()).take() {
                worker.answer(req, rid);
            }
        });
        if spawned.is_err() {
            // no thread to be had (the slot is at its process limit): answered here, in turn
            if let Some((req, rid)) = handled.lock().unwrap_or_else(|e| e.into_inner()).take() {
                runner.answer(req, rid);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // not the runner: what starts a slot's sandbox (its groups joined, its network linked to the hub)
    let front = args.get(1).map(String::as_str);
    if front == Some(cgjoin::FLAG) || front == Some(slotnet::FLAG) {
        let why = match cgjoin::join(&args[1..]) {
            Err(why) => why,
            Ok(rest) if rest.first().map(String::as_str) == Some(slotnet::FLAG) => slotnet::main(&rest[1..]),
            Ok(rest) if rest.first().map(String::as_str) == Some("--") => cgjoin::exec(&rest[1..]),
            Ok(_) => format!(
                "atropos-runner: {} needs -- COMMAND or {} after it",
                cgjoin::FLAG,
                slotnet::FLAG
            ),
        };
        eprintln!("{why}");
        std::process::exit(1);
    }
    if let Err(message) = run() {
        eprintln!("{message}");
        std::process::exit(1);
    }
}
