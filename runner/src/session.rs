//! A persistent bash per slot (`bash_session` tool): cwd and environment survive between calls.
//!
//! Commands reach the shell on a private control pipe as NUL-terminated (marker, command) pairs;
//! the shell `eval`s each in its own context, then prints the marker with the exit code on stdout
//! and the marker alone on stderr. A command is done when both markers arrived: no sleeps, no
//! prompt scraping, and the marker is random per command so output cannot fake it. One reader
//! thread per shell takes in what it prints, also between commands (background jobs' output).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::capture::{buffers, BoundedBuffer, Emit, TailBuffer, BACKGROUND_LOG};
use crate::children::{self, Child};
use crate::oneshot::shell;
use crate::outcome::{add_note, outcome_of, Outcome};
use crate::{procs, sys};

const LOOP: &str = concat!(
    "while IFS= read -r -d '' -u {fd} __atropos_mark && IFS= read -r -d '' -u {fd} __atropos_cmd; do ",
    "eval \"$__atropos_cmd\" {fd}<&- </dev/null; ",
    "__atropos_rc=$?; ",
    "printf '%s %d\\n' \"$__atropos_mark\" \"$__atropos_rc\"; ",
    "printf '%s\\n' \"$__atropos_mark\" >&2; ",
    "done"
);

pub const SESSION_RESTARTED: &str = "the session's shell had ended since the last call; this is a new shell \
(working directory and environment are back to their start)";

/// how long a timed-out command's shell gets to print its marker once the command's processes
/// are dead; a shell still busy after that (a builtin loop) is itself killed and replaced
const SHELL_GRACE: Duration = Duration::from_secs(1);

/// Splits a stream into command output and the end marker, across chunk boundaries.
struct Scanner {
    marker: Vec<u8>,
    buf: BoundedBuffer,
    want_code: bool,
    pending: Vec<u8>,
    done: Option<Option<i32>>,
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || haystack.len() < from + needle.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| at + from)
}

impl Scanner {
    /// Take the command's part of `chunk`; what follows its end marker (a background job's
    /// output) is returned.
    fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.done.is_some() {
            return chunk.to_vec();
        }
        self.pending.extend_from_slice(chunk);
        let Some(at) = find(&self.pending, &self.marker, 0) else {
            // hold back only what could be the start of the marker: output reaches a streamed
            // call as it comes, not once some more has followed it
            let flush = self.pending.len() - self.partial_marker();
            if flush > 0 {
                let head: Vec<u8> = self.pending.drain(..flush).collect();
                self.buf.write(&head);
            }
            return Vec::new();
        };
        let rest = &self.pending[at + self.marker.len()..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return Vec::new(); // the exit code line is not complete yet
        };
        let code = if self.want_code {
            std::str::from_utf8(&rest[..nl])
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
        } else {
            None
        };
        let after = rest[nl + 1..].to_vec();
        let output: Vec<u8> = self.pending[..at].to_vec();
        self.buf.write(&output);
        self.pending.clear();
        self.done = Some(code);
        after
    }

    /// How many bytes at the end of what is pending could begin the marker.
    fn partial_marker(&self) -> usize {
        let start = self.pending.len().saturating_sub(self.marker.len() - 1);
        (start..self.pending.len())
            .find(|&at| self.marker.starts_with(&self.pending[at..]))
            .map(|at| self.pending.len() - at)
            .unwrap_or(0)
    }

    fn flush_rest(&mut self) {
        let rest = std::mem::take(&mut self.pending);
        self.buf.write(&rest);
    }
}

/// What the session's reader threads and its calls share.
struct State {
    sinks: [Option<Scanner>; 2],
    /// what the shell's background jobs print between and after commands: kept for
    /// `read_background` (the newest BACKGROUND_LOG bytes)
    background: TailBuffer,
    /// the current shell (each start counts one), its exit code once it exited, and its pipes
    generation: u64,
    exited: Option<i32>,
    pipes: Option<(RawFd, RawFd)>,
}

impl State {
    fn feed(&mut self, stream: usize, chunk: &[u8]) {
        let after = match self.sinks[stream].as_mut() {
            Some(sink) => sink.feed(chunk),
            None => chunk.to_vec(),
        };
        if !after.is_empty() {
            self.background.write(&after);
        }
    }

    /// Take in what the current shell's pipes hold now.
    fn drain(&mut self) {
        if let Some((out, err)) = self.pipes {
            sys::drain(out, |c| self.feed(0, c));
            sys::drain(err, |c| self.feed(1, c));
        }
    }

    fn both_done(&self) -> bool {
        self.sinks.iter().all(|s| s.as_ref().is_some_and(|s| s.done.is_some()))
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Shell {
    pid: i32,
    control: OwnedFd,
    /// dropped to stop the shell's reader thread (its poll sees the hang-up)
    _stop: OwnedFd,
}

/// The session's shell and the pipes to it, as a hibernating runner passes them on.
pub struct SessionFds {
    pub pid: i32,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub control: RawFd,
}

pub struct Inner {
    shell: Option<Shell>,
    /// the shell died before this runner hibernated (see `lost`)
    lost_earlier: bool,
}

pub struct Session {
    inner: Mutex<Inner>,
    shared: Arc<Shared>,
    prelude: String,
}

/// The reader of one shell: feeds what it prints into the session's state until it exits (then
/// takes in what its pipes still hold) or the session closes it.
fn read_shell(shared: Arc<Shared>, child: Child, stop: OwnedFd, generation: u64) {
    let (out, err, exit, stop) = (
        child.stdout.as_raw_fd(),
        child.stderr.as_raw_fd(),
        child.exited.as_raw_fd(),
        stop.as_raw_fd(),
    );
    let (mut out_open, mut err_open) = (true, true);
    loop {
        let mut fds = vec![stop, exit];
        if out_open {
            fds.push(out);
        }
        if err_open {
            fds.push(err);
        }
        if sys::poll_readable(&fds, -1).is_err() {
            break;
        }
        let mut state = shared.lock();
        if state.generation != generation || matches!(sys::poll_readable(&[stop], 0), Ok(sys::Ready::Readable)) {
            break;
        }
        if out_open {
            out_open = !sys::drain(out, |c| state.feed(0, c));
        }
        if err_open {
            err_open = !sys::drain(err, |c| state.feed(1, c));
        }
        if let Ok(sys::Ready::Readable) = sys::poll_readable(&[exit], 0) {
            state.exited = Some(children::read_exit(exit));
            state.pipes = None;
            shared.changed.notify_all();
            break;
        }
        shared.changed.notify_all();
    }
    drop(child);
}

impl Session {
    pub fn new(prelude: String) -> Self {
        let state = State {
            sinks: [None, None],
            background: TailBuffer::new(BACKGROUND_LOG),
            generation: 0,
            exited: None,
            pipes: None,
        };
        Session {
            inner: Mutex::new(Inner {
                shell: None,
                lost_earlier: false,
            }),
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
            prelude,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shell runs: neither its reader saw it exit nor has it exited meanwhile (killed between
    /// calls, or while the runner slept: the next call must not be written to a dead shell).
    fn alive(&self, inner: &Inner) -> bool {
        match inner.shell.as_ref() {
            Some(shell) => self.shared.lock().exited.is_none() && !children::has_exited(shell.pid),
            None => false,
        }
    }

    /// The shell died since the last call, not closed by us: the next call says so.
    fn lost(&self, inner: &Inner) -> bool {
        inner.lost_earlier || (inner.shell.is_some() && !self.alive(inner))
    }

    fn watch(&self, inner: &mut Inner, child: Child, control: OwnedFd) -> io::Result<()> {
        let (stop_r, stop_w) = sys::pipe()?;
        sys::set_nonblocking(child.stdout.as_raw_fd(), true)?;
        sys::set_nonblocking(child.stderr.as_raw_fd(), true)?;
        let generation = {
            let mut state = self.shared.lock();
            state.generation += 1;
            state.exited = None;
            state.pipes = Some((child.stdout.as_raw_fd(), child.stderr.as_raw_fd()));
            state.generation
        };
        let pid = child.pid;
        let shared = self.shared.clone();
        let reader = std::thread::Builder::new()
            .name("session-reader".into())
            .spawn(move || read_shell(shared, child, stop_r, generation));
        if let Err(e) = reader {
            // no thread to be had (the slot is at its process limit): no shell without its reader
            procs::kill_tree(pid, true);
            self.shared.lock().pipes = None;
            return Err(e);
        }
        inner.shell = Some(Shell {
            pid,
            control,
            _stop: stop_w,
        });
        Ok(())
    }

    fn start(&self, inner: &mut Inner) -> io::Result<()> {
        let (ctrl_r, ctrl_w) = sys::pipe()?;
        let script = LOOP.replace("{fd}", &ctrl_r.as_raw_fd().to_string());
        let child = shell(
            &self.prelude,
            &script,
            &["--noprofile", "--norc"],
            Some(ctrl_r.as_raw_fd()),
        )?;
        drop(ctrl_r);
        self.watch(inner, child, ctrl_w)
    }

    fn close_locked(&self, inner: &mut Inner) -> usize {
        let mut killed = 0;
        if let Some(shell) = inner.shell.take() {
            if self.shared.lock().exited.is_none() {
                killed = procs::kill_tree(shell.pid, true);
            }
            let mut state = self.shared.lock();
            state.generation += 1; // its reader stops; what it still holds is nobody's
            state.pipes = None;
        }
        killed
    }

    /// Kill the shell and everything it started; how many processes died.
    pub fn close(&self) -> usize {
        let mut inner = self.lock();
        self.close_locked(&mut inner)
    }

    pub fn run(
        &self,
        command: &str,
        timeout: Duration,
        cap: usize,
        emit: Option<&Emit>,
        read_background: bool,
    ) -> io::Result<Outcome> {
        let started = Instant::now();
        let mut inner = self.lock();
        let (out, err) = buffers(cap, emit);
        if command.contains('\0') {
            let error = Some("command contains a NUL byte".to_string());
            return Ok(outcome_of(&out, &err, None, false, started, error));
        }
        let lost = self.lost(&inner);
        inner.lost_earlier = false;
        if !self.alive(&inner) {
            self.close_locked(&mut inner);
            self.start(&mut inner)?;
        }
        let (pid, control) = match inner.shell.as_ref() {
            Some(shell) => (shell.pid, shell.control.as_raw_fd()),
            None => return Err(io::Error::other("the session's shell did not start")),
        };
        let marker = format!("__ATROPOS_END_{}__", sys::random_hex(16)).into_bytes();
        {
            let mut state = self.shared.lock();
            state.drain(); // what the pipes hold now was printed before this command: background output
            state.sinks = [
                Some(Scanner {
                    marker: marker.clone(),
                    buf: out,
                    want_code: true,
                    pending: Vec::new(),
                    done: None,
                }),
                Some(Scanner {
                    marker: marker.clone(),
                    buf: err,
                    want_code: false,
                    pending: Vec::new(),
                    done: None,
                }),
            ];
        }
        let mut message = marker.clone();
        message.push(0);
        message.extend_from_slice(command.as_bytes());
        message.push(0);
        // a shell that died meanwhile refuses the write (EPIPE): its exit says what happened
        let _ = sys::write_all(control, &message);
        let mut timed_out = false;
        let mut error: Option<String> = None;
        if !self.wait(timeout) {
            timed_out = true;
            procs::kill_tree(pid, false); // the command, not the shell
            if !self.wait(SHELL_GRACE) {
                error = Some("command timed out and the shell itself was busy: the session was restarted".into());
                self.close_locked(&mut inner);
            }
        }
        let mut state = self.shared.lock();
        let code;
        let ended = !state.both_done();
        if !ended {
            code = state.sinks[0].as_ref().and_then(|s| s.done.flatten());
        } else {
            state.drain();
            for sink in state.sinks.iter_mut().flatten() {
                sink.flush_rest();
            }
            code = state.exited;
            error.get_or_insert_with(|| "the session's shell exited; the next call starts a new shell".into());
        }
        let [out, err] = std::mem::take(&mut state.sinks);
        let background = read_background.then(|| state.background.take());
        drop(state);
        if ended {
            self.close_locked(&mut inner);
        }
        let (out, err) = match (out, err) {
            (Some(o), Some(e)) => (o.buf, e.buf),
            _ => return Err(io::Error::other("the session's output was lost")),
        };
        let mut result = outcome_of(&out, &err, code, timed_out, started, error);
        if lost {
            add_note(&mut result, SESSION_RESTARTED);
        }
        if let Some(text) = background {
            result.insert("background".into(), text.into());
        }
        Ok(result)
    }

    /// Until the command's two markers arrived or the shell exited; false when `timeout` passed.
    fn wait(&self, timeout: Duration) -> bool {
        let state = self.shared.lock();
        let (state, waited) = self
            .shared
            .changed
            .wait_timeout_while(state, timeout, |s| !s.both_done() && s.exited.is_none())
            .unwrap_or_else(|e| e.into_inner());
        drop(state);
        !waited.timed_out()
    }

    // -- hibernation (see hibernate.rs) ---------------------------------------------------------

    /// The live shell and its pipes, with what its background jobs printed and nobody read
    /// (taken in now: the runner this one resumes as would give it to the next command), and
    /// whether the shell was lost. The caller execs with the state lock still held (`hold`).
    pub fn for_hibernation<R>(&self, pass_on: impl FnOnce(Option<SessionFds>, bool, (Vec<u8>, u64)) -> R) -> R {
        let inner = self.lock();
        let lost = self.lost(&inner);
        let mut state = self.shared.lock();
        state.drain();
        let fds = match (inner.shell.as_ref(), state.exited, state.pipes) {
            (Some(shell), None, Some((stdout, stderr))) => Some(SessionFds {
                pid: shell.pid,
                stdout,
                stderr,
                control: shell.control.as_raw_fd(),
            }),
            _ => None,
        };
        let held = state.background.held();
        pass_on(fds, lost, held)
    }

    /// The pid of the live shell, if any.
    pub fn shell_pid(&self) -> Option<i32> {
        let inner = self.lock();
        if self.alive(&inner) {
            inner.shell.as_ref().map(|s| s.pid)
        } else {
            None
        }
    }

    /// Take back what a hibernated runner held: its shell, what its background jobs printed.
    pub fn resume(&self, fds: Option<SessionFds>, lost: bool, background: &[u8], dropped: u64) -> io::Result<()> {
        let mut inner = self.lock();
        inner.lost_earlier = lost;
        self.shared.lock().background.restore(background, dropped);
        if let Some(fds) = fds {
            // SAFETY: these fds were passed to us across exec and are owned by nothing else here
            let (out, err, control) = unsafe {
                (
                    OwnedFd::from_raw_fd(fds.stdout),
                    OwnedFd::from_raw_fd(fds.stderr),
                    OwnedFd::from_raw_fd(fds.control),
                )
            };
            for fd in [&out, &err, &control] {
                sys::set_inheritable(fd.as_raw_fd(), false)?; // the runner's own, never a command's
            }
            let child = children::adopt(fds.pid, out, err)?;
            self.watch(&mut inner, child, control)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner(marker: &str) -> Scanner {
        Scanner {
            marker: marker.into(),
            buf: BoundedBuffer::new(1000),
            want_code: true,
            pending: Vec::new(),
            done: None,
        }
    }

    #[test]
    fn marker_split_across_chunks() {
        let mut s = scanner("__END__");
        assert!(s.feed(b"hello __EN").is_empty());
        assert_eq!(s.buf.text(), "hello ");
        assert_eq!(s.feed(b"D__ 3\nlater"), b"later");
        assert_eq!(s.done, Some(Some(3)));
        assert_eq!(s.buf.text(), "hello ");
    }
}
