//! Child processes of the runner: spawning and one reaper for all.
//!
//! The runner is a child subreaper, so orphans of commands are reparented to it and must be
//! reaped. SIGCHLD is blocked in every thread and taken by the signal thread (main.rs), which
//! calls `reap`; a spawned child's exit code reaches its waiter through a pipe of its own, so a
//! waiter polls it beside the child's output.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::sys;

extern "C" {
    static environ: *const *const libc::c_char;
}

/// Pids we wait for, each with the write end of its exit pipe. Held while spawning, so a child
/// that exits at once is registered before the reaper looks it up.
static WAITING: Mutex<Option<HashMap<i32, OwnedFd>>> = Mutex::new(None);

pub struct Child {
    pub pid: i32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// readable once the child has exited: its exit code (4 bytes), as shells report it
    pub exited: OwnedFd,
}

/// Killed by signal N: 128+N, as shells report it.
fn exit_code_of(status: libc::c_int) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

fn deliver(waiting: &mut HashMap<i32, OwnedFd>, pid: i32, code: i32) {
    if let Some(fd) = waiting.remove(&pid) {
        let _ = sys::write_all(fd.as_raw_fd(), &code.to_le_bytes());
    }
}

/// Reap every child that has exited (ours and reparented orphans alike).
pub fn reap() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let mut guard = WAITING.lock().unwrap_or_else(|e| e.into_inner());
        deliver(guard.get_or_insert_with(HashMap::new), pid, exit_code_of(status));
    }
}

/// The exit code waiting in a child's exit pipe (-1: it was lost to us).
pub fn read_exit(fd: RawFd) -> i32 {
    let mut buf = [0u8; 4];
    match sys::read(fd, &mut buf) {
        Ok(4) => i32::from_le_bytes(buf),
        _ => -1,
    }
}

struct SpawnSetup {
    actions: libc::posix_spawn_file_actions_t,
    attr: libc::posix_spawnattr_t,
}

impl SpawnSetup {
    /// stdin from /dev/null, stdout and stderr to the pipes; a session of its own (its tree is
    /// findable by sid); no blocked signals, and SIGPIPE/SIGXFSZ back to their defaults (Rust
    /// ignores SIGPIPE, and an ignored signal stays ignored across exec: `yes | head` would end
    /// with "Broken pipe" errors and a file over RLIMIT_FSIZE with EFBIG instead of SIGXFSZ).
    fn new(out: RawFd, err: RawFd) -> io::Result<Self> {
        // SAFETY: both structures are initialised by their init calls before any other use, and
        // destroyed in Drop; the path is a NUL-terminated literal
        unsafe {
            let mut setup = SpawnSetup {
                actions: std::mem::zeroed(),
                attr: std::mem::zeroed(),
            };
            sys::check(libc::posix_spawn_file_actions_init(&mut setup.actions))?;
            sys::check(libc::posix_spawnattr_init(&mut setup.attr))?;
            let devnull = c"/dev/null";
            libc::posix_spawn_file_actions_addopen(&mut setup.actions, 0, devnull.as_ptr(), libc::O_RDONLY, 0);
            libc::posix_spawn_file_actions_adddup2(&mut setup.actions, out, 1);
            libc::posix_spawn_file_actions_adddup2(&mut setup.actions, err, 2);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::posix_spawnattr_setsigmask(&mut setup.attr, &none);
            let mut defaults: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut defaults);
            libc::sigaddset(&mut defaults, libc::SIGPIPE);
            libc::sigaddset(&mut defaults, libc::SIGXFSZ);
            libc::posix_spawnattr_setsigdefault(&mut setup.attr, &defaults);
            let flags = libc::POSIX_SPAWN_SETSID
                | libc::POSIX_SPAWN_SETSIGMASK as libc::c_short
                | libc::POSIX_SPAWN_SETSIGDEF as libc::c_short;
            libc::posix_spawnattr_setflags(&mut setup.attr, flags);
            Ok(setup)
        }
    }
}

impl Drop for SpawnSetup {
    fn drop(&mut self) {
        // SAFETY: both were initialised in new
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

/// Start `argv` (found on PATH) with the runner's environment and cwd (the workspace).
/// posix_spawn (vfork + exec in libc) costs a fraction of fork's; every fd we own is
/// close-on-exec except `pass_fd`, made inheritable for this spawn alone (under the lock, so no
/// other command inherits it). A refused fork is `ErrorKind::WouldBlock` (EAGAIN).
pub fn spawn(argv: &[&str], pass_fd: Option<RawFd>) -> io::Result<Child> {
    let argv = sys::Argv::new(argv)?;
    let (out_r, out_w) = sys::pipe()?;
    let (err_r, err_w) = sys::pipe()?;
    let (exit_r, exit_w) = sys::pipe()?;
    let setup = SpawnSetup::new(out_w.as_raw_fd(), err_w.as_raw_fd())?;
    let mut guard = WAITING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(fd) = pass_fd {
        sys::set_inheritable(fd, true)?;
    }
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the NUL-terminated argv array, the set-up
    // structures, and the process's environment (never changed after start-up)
    let rc = unsafe {
        libc::posix_spawnp(
            &mut pid,
            argv.program(),
            &setup.actions,
            &setup.attr,
            argv.as_ptr() as *const *mut libc::c_char,
            environ as *const *mut libc::c_char,
        )
    };
    if let Some(fd) = pass_fd {
        let _ = sys::set_inheritable(fd, false);
    }
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    guard.get_or_insert_with(HashMap::new).insert(pid, exit_w);
    drop(guard);
    Ok(Child {
        pid,
        stdout: out_r,
        stderr: err_r,
        exited: exit_r,
    })
}

/// A child this process started before it exec'd again (hibernation): waited for like one
/// spawned now; one that already exited (or that is not ours any more) is reported at once.
pub fn adopt(pid: i32, stdout: OwnedFd, stderr: OwnedFd) -> io::Result<Child> {
    let (exit_r, exit_w) = sys::pipe()?;
    let mut guard = WAITING.lock().unwrap_or_else(|e| e.into_inner());
    let waiting = guard.get_or_insert_with(HashMap::new);
    waiting.insert(pid, exit_w);
    let mut status = 0;
    // SAFETY: waitpid with a valid status pointer
    match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
        0 => {}
        n if n > 0 => deliver(waiting, pid, exit_code_of(status)),
        _ => deliver(waiting, pid, -1),
    }
    Ok(Child {
        pid,
        stdout,
        stderr,
        exited: exit_r,
    })
}

/// Whether child `pid` has exited (a zombie not reaped yet, or reaped already), without reaping it:
/// what a waiter learns only once the reaper and its own thread got to it.
pub fn has_exited(pid: i32) -> bool {
    // SAFETY: waitid with a valid siginfo out pointer; WNOWAIT leaves the child to the reaper
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc != 0 || info.si_pid() == pid
    }
}
