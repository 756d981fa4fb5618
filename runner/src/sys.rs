//! Thin safe wrappers over the few system calls the runner makes on raw fds.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array on success
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just made and are owned by nobody else
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of its length
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// All of `data` to `fd` (blocking).
pub fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: data is valid for reads of its length
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn update_flags(fd: RawFd, get: libc::c_int, set: libc::c_int, flag: libc::c_int, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold, with integer arguments
    let flags = check(unsafe { libc::fcntl(fd, get) })?;
    let wanted = if on { flags | flag } else { flags & !flag };
    if wanted != flags {
        // SAFETY: as above
        check(unsafe { libc::fcntl(fd, set, wanted) })?;
    }
    Ok(())
}

pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    update_flags(fd, libc::F_GETFL, libc::F_SETFL, libc::O_NONBLOCK, on)
}

/// Whether `fd` survives exec (the session's pipes across hibernation; the control pipe's read
/// end for the session's shell).
pub fn set_inheritable(fd: RawFd, on: bool) -> io::Result<()> {
    update_flags(fd, libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC, !on)
}

pub enum Ready {
    Readable,
    TimedOut,
}

/// Wait until one of `fds` is readable (or hung up), at most `timeout_ms` (negative: forever).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Ready> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: polled is a valid array of pollfd of the given length
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Ok(Ready::TimedOut);
        }
        return Ok(Ready::Readable);
    }
}

/// Everything readable now from a non-blocking `fd`, chunk by chunk; true at end of file.
pub fn drain(fd: RawFd, mut sink: impl FnMut(&[u8])) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match read(fd, &mut buf) {
            Ok(0) => return true,
            Ok(n) => sink(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// `n` random bytes as hex, from the kernel (the session's end markers).
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // SAFETY: buf is valid for writes of n bytes; getrandom fills at most that many
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), n, 0) };
    if got != n as isize {
        // never weaker than the clock and pid when the kernel refuses (it does not for small reads)
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8 ^ (std::process::id() as u8).wrapping_mul(i as u8 + 1);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A command line as exec and posix_spawn take it: NUL-terminated strings, and a NULL-terminated
/// array of pointers to them (valid while this lives: a CString's bytes do not move with it).
pub struct Argv {
    _strings: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl Argv {
    /// `InvalidInput` for an empty command line or an argument that holds a NUL byte.
    pub fn new<S: AsRef<str>>(args: &[S]) -> io::Result<Argv> {
        let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
        if args.is_empty() {
            return Err(invalid("no program to run"));
        }
        let strings = args
            .iter()
            .map(|a| CString::new(a.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid("an argument holds a NUL byte"))?;
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        Ok(Argv {
            _strings: strings,
            ptrs,
        })
    }

    pub fn program(&self) -> *const libc::c_char {
        self.ptrs[0]
    }

    pub fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn an_argv_is_null_terminated_and_refuses_what_exec_could_not_take() {
        let argv = Argv::new(&["bash", "-c", "true"]).unwrap();
        // SAFETY: the array holds three valid strings, then NULL, while `argv` lives
        let seen: Vec<&str> = (0..3)
            .map(|i| unsafe { CStr::from_ptr(*argv.as_ptr().add(i)) }.to_str().unwrap())
            .collect();
        assert_eq!(seen, ["bash", "-c", "true"]);
        assert!(unsafe { *argv.as_ptr().add(3) }.is_null());
        assert_eq!(argv.program(), unsafe { *argv.as_ptr() });
        for bad in [&["a\0b"][..], &[][..]] {
            let err = Argv::new(bad).err().expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
