//! Hibernation (the twin of atropos.sandbox.runner.hibernate): an idle runner gives its memory
//! back and comes back on the next request. It answers `{"ok": true}` and execs, in the same
//! process, a holder: a `/bin/sh` that reads one line from the runner's stdin and then execs the
//! runner again with `--resume STATE`. The pid stays, so the session's shell stays this
//! process's child and the sandbox, its limits and the server's pipes stay. STATE is the Python
//! runner's: the shell's pid and the three pipe fds to it, what its background jobs printed and
//! nobody read yet (in a memfd), a limit trip not yet reported, the workspace size last seen.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use serde_json::{json, Value};

use crate::session::SessionFds;
use crate::{procs, sys};

pub const HOLDER: &str = "/bin/sh";
/// one line, then the runner again; EOF means the server is gone: the slot ends with us
const HOLD: &str = "IFS= read -r _ || exit 0; exec \"$@\"";
pub const RESUME_FLAG: &str = "--resume";

/// Why this runner cannot hibernate now (None: it can): any process in the slot but the
/// session's shell, or a socket that shell holds.
pub fn why_not(shell: Option<i32>) -> Option<String> {
    let mut others = procs::tree_members(procs::own_pid(), &procs::snapshot(), false);
    if let Some(pid) = shell {
        others.remove(&pid);
    }
    if !others.is_empty() {
        return Some(format!("{} other process(es) run in the slot", others.len()));
    }
    if shell.is_some_and(holds_socket) {
        return Some("the session's shell holds a socket".into());
    }
    let holder = CString::new(HOLDER).unwrap_or_default();
    // SAFETY: access with a NUL-terminated path
    if unsafe { libc::access(holder.as_ptr(), libc::X_OK) } != 0 {
        return Some(format!("no {HOLDER} in the sandbox"));
    }
    None
}

fn holds_socket(pid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")))
}

/// `data` in an inheritable memfd (it survives exec), or -1 when there is none.
fn stash(data: &[u8]) -> io::Result<RawFd> {
    if data.is_empty() {
        return Ok(-1);
    }
    let name = c"atropos-background";
    // SAFETY: memfd_create with a NUL-terminated name
    let fd = sys::check(unsafe { libc::memfd_create(name.as_ptr(), 0) })?;
    sys::write_all(fd, data)?;
    Ok(fd)
}

/// What a memfd from `stash` holds (it is closed).
pub fn unstash(fd: RawFd) -> Vec<u8> {
    let mut data = Vec::new();
    if fd < 0 {
        return data;
    }
    // SAFETY: lseek and close on the fd passed to us; it is ours alone
    unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
    let _ = sys::set_inheritable(fd, false);
    sys::drain(fd, |chunk| data.extend_from_slice(chunk));
    unsafe { libc::close(fd) };
    data
}

pub struct Held {
    pub session: Option<SessionFds>,
    pub session_lost: bool,
    pub background: (Vec<u8>, u64),
    pub unreported: Option<String>,
    pub last_size: u64,
}

/// Exec the holder, which execs this runner's own command line again with the state. Returns
/// only on failure.
pub fn hold(held: Held) -> io::Error {
    match exec_holder(held) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn exec_holder(held: Held) -> io::Result<Never> {
    let background = stash(&held.background.0)?;
    let session = match &held.session {
        Some(s) => {
            for fd in [s.stdout, s.stderr, s.control] {
                sys::set_inheritable(fd, true)?;
            }
            json!({"pid": s.pid, "stdout": s.stdout, "stderr": s.stderr, "control": s.control})
        }
        None => Value::Null,
    };
    let state = json!({
        "session": session,
        "session_lost": held.session_lost,
        "background": background,
        "dropped": held.background.1,
        "unreported": held.unreported,
        "last_size": held.last_size,
    });
    let mut argv: Vec<String> = vec![HOLDER.into(), "-c".into(), HOLD.into(), "atropos-hold".into()];
    argv.extend(without_resume(std::env::args().collect()));
    argv.extend([RESUME_FLAG.to_string(), state.to_string()]);
    let argv = sys::Argv::new(&argv)?;
    // SAFETY: a NUL-terminated array of NUL-terminated strings, all alive for the call
    unsafe { libc::execv(argv.program(), argv.as_ptr()) };
    Err(io::Error::last_os_error())
}

fn without_resume(mut argv: Vec<String>) -> Vec<String> {
    if let Some(at) = argv.iter().position(|a| a == RESUME_FLAG) {
        argv.drain(at..(at + 2).min(argv.len()));
    }
    argv
}
