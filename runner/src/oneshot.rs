//! One-shot commands (`bash` tool): run, capture bounded output, enforce the timeout on the tree.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::capture::{buffers, BoundedBuffer, Emit};
use crate::children::{self, Child};
use crate::outcome::{outcome_of, Outcome};
use crate::{procs, sys};

/// `bash -c SCRIPT` with the CPU prelude on the script's first line (its line numbers stay).
pub fn shell(prelude: &str, script: &str, options: &[&str], pass_fd: Option<RawFd>) -> io::Result<Child> {
    let body = format!("{prelude}{script}");
    let mut argv = vec!["bash"];
    argv.extend_from_slice(options);
    argv.extend_from_slice(&["-c", &body]);
    children::spawn(&argv, pass_fd)
}

/// Feed `fd` into `buf` until it would block; false once it reached end of file.
fn pump(fd: RawFd, buf: &mut BoundedBuffer) -> bool {
    !sys::drain(fd, |chunk| buf.write(chunk))
}

pub fn run_oneshot(
    prelude: &str,
    command: &str,
    timeout: Duration,
    cap: usize,
    emit: Option<&Emit>,
) -> io::Result<Outcome> {
    let started = Instant::now();
    let (mut out, mut err) = buffers(cap, emit);
    let child = shell(prelude, command, &[], None)?;
    let (out_fd, err_fd, exit_fd) = (
        child.stdout.as_raw_fd(),
        child.stderr.as_raw_fd(),
        child.exited.as_raw_fd(),
    );
    sys::set_nonblocking(out_fd, true)?;
    sys::set_nonblocking(err_fd, true)?;
    let deadline = started + timeout;
    let (mut out_open, mut err_open, mut timed_out) = (true, true, false);
    let code = loop {
        let mut fds = vec![exit_fd];
        if out_open {
            fds.push(out_fd);
        }
        if err_open {
            fds.push(err_fd);
        }
        let wait_ms = if timed_out {
            -1
        } else {
            deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32
        };
        match sys::poll_readable(&fds, wait_ms)? {
            sys::Ready::TimedOut => {
                timed_out = true;
                procs::kill_tree(child.pid, true);
            }
            sys::Ready::Readable => {
                // read both pipes before looking at the exit, so nothing written is left behind
                if out_open {
                    out_open = pump(out_fd, &mut out);
                }
                if err_open {
                    err_open = pump(err_fd, &mut err);
                }
                if let Ok(sys::Ready::Readable) = sys::poll_readable(&[exit_fd], 0) {
                    break children::read_exit(exit_fd);
                }
            }
        }
    };
    // what the command wrote before it exited is in the pipes; background children that still
    // hold them open do not delay the answer
    if out_open {
        pump(out_fd, &mut out);
    }
    if err_open {
        pump(err_fd, &mut err);
    }
    Ok(outcome_of(&out, &err, Some(code), timed_out, started, None))
}
