//! Resource limits of a slot as the runner enforces them (the twin of
//! atropos.sandbox.runner.rlimits and .watch): hard rlimits set on the runner and inherited by
//! every command; the CPU time limit set by each command's own shell; and a watch over what the
//! kernel cannot bound alone (the workspace's size, and the process count where no pids cgroup
//! or RLIMIT_NPROC holds it).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::procs;

const TICK: Duration = Duration::from_millis(250);
/// a workspace scan walks the tree: never spend more than ~5% of the time on it
const SCAN_SHARE: f64 = 20.0;
const MIN_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// always present in a slot's PID namespace: the runner (its pid 1) and its threads, the session's
/// shell, and some room
const RESIDENT: usize = 8;
/// a fork bomb churns just below a kernel-held limit: a slot this close to it is stopped
const NEAR_FULL: f64 = 0.9;

#[derive(Clone, Default)]
pub struct RunnerLimits {
    pub memory: Option<u64>,
    pub file_size: Option<u64>,
    pub cpu_seconds: Option<u64>,
    pub workspace: Option<u64>,
    pub processes: Option<u64>,
    pub nproc_rlimit: bool,
}

fn set_hard(which: libc::__rlimit_resource_t, value: u64) {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit structure
    unsafe {
        libc::getrlimit(which, &mut current);
        // never above what we were given
        let value = if current.rlim_max != libc::RLIM_INFINITY {
            value.min(current.rlim_max)
        } else {
            value
        };
        let wanted = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        if libc::setrlimit(which, &wanted) != 0 {
            eprintln!(
                "runner: cannot set a resource limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl RunnerLimits {
    /// Hard rlimits on the runner, inherited by every command and never raised by one.
    pub fn apply_to_self(&self) {
        set_hard(libc::RLIMIT_CORE, 0);
        if let Some(memory) = self.memory {
            set_hard(libc::RLIMIT_DATA, memory);
        }
        if let Some(size) = self.file_size {
            set_hard(libc::RLIMIT_FSIZE, size);
        }
        if let (true, Some(count)) = (self.nproc_rlimit, self.processes) {
            set_hard(libc::RLIMIT_NPROC, count);
        }
    }

    /// Shell that gives the shell running it the CPU time limit (SIGXCPU at the limit, SIGKILL a
    /// second later), run by the command's own shell first, so nothing it starts escapes it.
    pub fn shell_prelude(&self) -> String {
        let Some(seconds) = self.cpu_seconds else {
            return String::new();
        };
        let mut given = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid structure
        unsafe { libc::getrlimit(libc::RLIMIT_CPU, &mut given) };
        let (mut soft, mut hard) = (seconds, seconds + 1);
        if given.rlim_max != libc::RLIM_INFINITY {
            // never above what we were given (a batch system's)
            soft = soft.min(given.rlim_max);
            hard = hard.min(given.rlim_max);
        }
        let failed = "echo 'atropos-sandbox: cannot set the CPU time limit' >&2; exit 126";
        format!("{{ ulimit -S -t {soft} && ulimit -H -t {hard}; }} || {{ {failed}; }}; ")
    }

    pub fn describe(&self, kind: &str) -> String {
        let value = match kind {
            "cpu_time" => self.cpu_seconds,
            "file_size" => self.file_size,
            "processes" => self.processes,
            "workspace" => self.workspace,
            "memory" => self.memory,
            _ => None,
        };
        describe_limit(kind, value)
    }
}

/// `2 << 30` -> `2 GiB`, `1536` -> `1.5 KiB` (as atropos.units.format_size).
pub fn format_size(n: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= scale {
            return if n.is_multiple_of(scale) {
                format!("{} {unit}", n / scale)
            } else {
                format!("{:.1} {unit}", n as f64 / scale as f64)
            };
        }
    }
    format!("{n} bytes")
}

fn describe_limit(kind: &str, value: Option<u64>) -> String {
    let size = value.filter(|v| *v > 0).map(format_size).unwrap_or_else(|| "?".into());
    let number = value
        .filter(|v| *v > 0)
        .map(|v| v.to_string())
        .unwrap_or_else(|| "?".into());
    match kind {
        "cpu_time" => format!("CPU time limit reached ({number} s per process)"),
        "file_size" => format!("file size limit reached ({size})"),
        "processes" => format!("process limit reached ({number} per slot)"),
        "workspace" => format!("workspace size limit reached ({size}); delete files to continue"),
        "memory" => format!("memory limit reached ({size})"),
        other => other.to_string(),
    }
}

/// what programs print when an allocation fails under RLIMIT_DATA (Python, C, C++, Go, Node, Rust)
const NO_MEMORY: [&str; 6] = [
    "MemoryError",
    "Cannot allocate memory",
    "std::bad_alloc",
    "out of memory",
    "JavaScript heap out of memory",
    "memory allocation of",
];

/// The limit a failed command most likely ran into, judged by its exit and its last words.
pub fn limit_of_result(ok: bool, exit_code: Option<i64>, stderr: &str) -> Option<&'static str> {
    match exit_code {
        Some(152) => return Some("cpu_time"),
        Some(153) => return Some("file_size"),
        Some(0) | None => return None,
        _ if ok => return None,
        _ => {}
    }
    let mut start = stderr.len().saturating_sub(2048);
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    let tail = &stderr[start..];
    NO_MEMORY.iter().any(|t| tail.contains(t)).then_some("memory")
}

/// Bytes allocated under `root` (st_blocks: sparse files count as what they use).
pub fn workspace_bytes(root: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![std::path::PathBuf::from(root)];
    while let Some(top) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&top) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Threads of all processes in our PID namespace: what its pids cgroup and RLIMIT_NPROC count.
fn count_tasks() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| std::fs::read_dir(e.path().join("task")).map(|t| t.count()).unwrap_or(0))
        .sum()
}

#[derive(Default)]
pub struct WatchState {
    active: usize,
    pub trips: u64,
    last_kind: Option<&'static str>,
    /// a trip while no call ran: the next call says so
    pub unreported: Option<String>,
    /// the workspace at the last scan (kept across hibernation)
    pub last_size: u64,
    next_scan: Option<Instant>,
}

/// Processes are counted in the slot's own PID namespace on every tick, also between calls (a
/// fork bomb started in the background is stopped even if no call follows); the workspace only
/// while calls run. Over a limit, every process of the slot but the runner is killed.
pub struct LimitWatch {
    root: String,
    limits: RunnerLimits,
    count: bool,
    pub state: Mutex<WatchState>,
    wake: Condvar,
}

impl LimitWatch {
    pub fn new(root: &str, limits: &RunnerLimits, own_pid_namespace: bool) -> Arc<Self> {
        Arc::new(LimitWatch {
            root: root.to_string(),
            limits: limits.clone(),
            count: own_pid_namespace && limits.processes.is_some(),
            state: Mutex::new(WatchState::default()),
            wake: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn start(self: &Arc<Self>) {
        if !self.count && self.limits.workspace.is_none() {
            return;
        }
        let watch = self.clone();
        let spawned = std::thread::Builder::new()
            .name("limit-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || watch.run());
        if let Err(e) = spawned {
            eprintln!("runner: cannot start the limit watch: {e}");
        }
    }

    pub fn enter(&self) -> u64 {
        let mut state = self.lock();
        state.active += 1;
        self.wake.notify_all();
        state.trips
    }

    /// Leave a call; the limit it tripped since it entered (`trips` from enter), if any.
    pub fn leave(&self, trips: u64) -> Option<&'static str> {
        let mut state = self.lock();
        state.active -= 1;
        if state.trips != trips {
            state.last_kind
        } else {
            None
        }
    }

    pub fn take_unreported(&self) -> Option<String> {
        self.lock().unreported.take()
    }

    fn run(&self) {
        loop {
            {
                let mut state = self.lock();
                while !self.count && state.active == 0 {
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            }
            std::thread::sleep(TICK);
            self.check();
        }
    }

    fn check(&self) {
        let tasks = if self.count { count_tasks() } else { 0 };
        let near_full = self
            .limits
            .processes
            .map(|p| tasks as f64 >= NEAR_FULL * p as f64)
            .unwrap_or(false);
        let mut kind = (self.count && near_full).then_some("processes");
        let busy = self.lock().active > 0 || tasks > RESIDENT;
        if kind.is_none() && busy {
            kind = self.over_workspace();
        }
        if let Some(kind) = kind {
            let mut state = self.lock();
            state.trips += 1;
            state.last_kind = Some(kind);
            if state.active == 0 {
                state.unreported = Some(kind.to_string());
            }
            drop(state);
            procs::kill_tree(procs::own_pid(), false);
        }
    }

    fn over_workspace(&self) -> Option<&'static str> {
        let limit = self.limits.workspace?;
        let now = Instant::now();
        if self.lock().next_scan.is_some_and(|at| now < at) {
            return None;
        }
        let size = workspace_bytes(&self.root);
        let cost = now.elapsed();
        let mut state = self.lock();
        state.next_scan = Some(Instant::now() + MIN_SCAN_INTERVAL.max(cost.mul_f64(SCAN_SHARE)));
        // only growth past the limit trips: a command that deletes files to get under it may run
        let grew = size > state.last_size;
        state.last_size = size;
        (size > limit && grew).then_some("workspace")
    }
}
