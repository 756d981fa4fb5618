//! Open tool paths inside a slot's workspace so that nothing outside it is ever read or written
//! (the twin of atropos.sandbox.runner.pathsafe).
//!
//! Paths are resolved one component at a time from a directory fd of the workspace root, each
//! step an `openat` with O_NOFOLLOW. A symlink is never followed by the kernel: its target is read
//! with `readlinkat` and resolved by the same walk, so a link that leaves the workspace is
//! refused. Every directory on the way is held open: swapping a component for a symlink between
//! two steps changes nothing, as the next step starts from the directory already opened.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys;

pub const WORKSPACE_ALIAS: &str = "/workspace";
const MAX_PATH_BYTES: usize = 4096;
const MAX_NAME_BYTES: usize = 255;
const MAX_SYMLINKS: usize = 40;
const MAX_RETRIES: usize = 64;
const DIR_FLAGS: libc::c_int = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

pub enum PathError {
    /// the path is refused: it leaves the workspace or cannot name a file in it
    Escape(String),
    Os(io::Error),
}

impl From<io::Error> for PathError {
    fn from(e: io::Error) -> Self {
        PathError::Os(e)
    }
}

/// A string as Python's repr() shows it (the messages match the Python runner's).
pub fn py_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(String::from)
        .collect()
}

fn check_text(path: &str) -> Result<(), PathError> {
    if path.contains('\0') {
        return Err(PathError::Escape("path contains a NUL byte".into()));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::Escape(format!(
            "path is too long ({} bytes, limit {MAX_PATH_BYTES})",
            path.len()
        )));
    }
    for part in components(path) {
        if part.len() > MAX_NAME_BYTES {
            let head: String = part.chars().take(32).collect();
            return Err(PathError::Escape(format!(
                "path component {}... is too long (limit {MAX_NAME_BYTES} bytes)",
                py_repr(&head)
            )));
        }
    }
    Ok(())
}

fn realpath(path: &str) -> String {
    std::fs::canonicalize(path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.to_string())
}

/// Components of an absolute path below the workspace (alias or host path), None if elsewhere.
fn inside_parts(root: &str, absolute: &str) -> Option<Vec<String>> {
    let parts = components(absolute);
    for top in [WORKSPACE_ALIAS.to_string(), realpath(root)] {
        let prefix = components(&top);
        if parts.len() >= prefix.len() && parts[..prefix.len()] == prefix[..] {
            return Some(parts[prefix.len()..].to_vec());
        }
    }
    None
}

fn climbs_above(parts: &[String]) -> bool {
    let mut depth: i64 = 0;
    for part in parts {
        depth += if part == ".." { -1 } else { 1 };
        if depth < 0 {
            return true;
        }
    }
    false
}

fn outside(path: &str) -> PathError {
    PathError::Escape(format!(
        "path {} is outside the workspace ({WORKSPACE_ALIAS})",
        py_repr(path)
    ))
}

/// The components of `path` relative to the workspace (`..` kept for the walk).
fn workspace_parts(root: &str, path: &str) -> Result<Vec<String>, PathError> {
    check_text(path)?;
    let parts = if path.starts_with('/') {
        inside_parts(root, path)
    } else {
        Some(components(path))
    };
    match parts {
        Some(parts) if !climbs_above(&parts) => Ok(parts),
        _ => Err(outside(path)),
    }
}

pub fn cstr(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn openat(dir: RawFd, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: openat with a valid NUL-terminated name; the fd returned is ours alone
    let fd = sys::check(unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: just opened
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn readlinkat(dir: RawFd, name: &str) -> io::Result<String> {
    let name = cstr(name)?;
    let mut buf = vec![0u8; MAX_PATH_BYTES + 1];
    // SAFETY: buf is valid for writes of its length
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Directory fds from the workspace root down to the current directory of a resolution.
struct Walk<'a> {
    root: &'a str,
    path: &'a str,
    fds: Vec<OwnedFd>,
    links: usize,
    last_link: String,
}

impl<'a> Walk<'a> {
    fn new(root: &'a str, path: &'a str) -> io::Result<Self> {
        let top = openat(
            libc::AT_FDCWD,
            root,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            0,
        )?;
        Ok(Walk {
            root,
            path,
            fds: vec![top],
            links: 0,
            last_link: String::new(),
        })
    }

    fn here(&self) -> RawFd {
        self.fds.last().map(|f| f.as_raw_fd()).unwrap_or(-1)
    }

    fn up(&mut self) -> Result<(), PathError> {
        if self.fds.len() == 1 {
            let how = if self.last_link.is_empty() {
                "goes".to_string()
            } else {
                format!("{} leads", self.last_link)
            };
            return Err(PathError::Escape(format!(
                "path {}: {how} outside the workspace ({WORKSPACE_ALIAS})",
                py_repr(self.path)
            )));
        }
        self.fds.pop();
        Ok(())
    }

    /// If `name` is a symlink, queue its target's components (in front) and return true.
    fn follow(&mut self, name: &str, pending: &mut VecDeque<String>) -> Result<bool, PathError> {
        let target = match readlinkat(self.here(), name) {
            Ok(t) => t,
            Err(e) if matches!(errno_of(&e), libc::EINVAL | libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        self.links += 1;
        self.last_link = format!("symlink {} -> {}", py_repr(name), py_repr(&target));
        if self.links > MAX_SYMLINKS {
            return Err(PathError::Escape(format!(
                "path {}: too many levels of symbolic links",
                py_repr(self.path)
            )));
        }
        let parts = if target.starts_with('/') {
            let Some(inside) = inside_parts(self.root, &target) else {
                return Err(PathError::Escape(format!(
                    "path {}: symlink {} -> {} points outside the workspace ({WORKSPACE_ALIAS})",
                    py_repr(self.path),
                    py_repr(name),
                    py_repr(&target)
                )));
            };
            self.fds.truncate(1);
            inside
        } else {
            components(&target)
        };
        for part in parts.into_iter().rev() {
            pending.push_front(part);
        }
        Ok(true)
    }

    /// Step into directory `name` of the current one (making it if `create`), or follow a symlink.
    fn enter(&mut self, name: &str, pending: &mut VecDeque<String>, create: bool) -> Result<(), PathError> {
        for _ in 0..MAX_RETRIES {
            match openat(self.here(), name, DIR_FLAGS, 0) {
                Ok(fd) => {
                    self.fds.push(fd);
                    return Ok(());
                }
                Err(e) if errno_of(&e) == libc::ENOENT => {
                    if !create {
                        return Err(e.into());
                    }
                }
                Err(e) if matches!(errno_of(&e), libc::ELOOP | libc::ENOTDIR) => {
                    if self.follow(name, pending)? {
                        return Ok(());
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
            let cname = cstr(name)?;
            // SAFETY: mkdirat with a valid name; EEXIST (made concurrently, or a dangling
            // symlink: the next open tells which) is not an error here
            if unsafe { libc::mkdirat(self.here(), cname.as_ptr(), 0o777) } != 0 {
                let e = io::Error::last_os_error();
                if errno_of(&e) != libc::EEXIST {
                    return Err(e.into());
                }
            }
            if self.follow(name, pending)? {
                return Ok(());
            }
        }
        Err(PathError::Escape(format!(
            "path {}: directory {} keeps changing; try again",
            py_repr(self.path),
            py_repr(name)
        )))
    }
}

/// An fd of `path` inside the workspace `root`, opened with `flags` (O_NOFOLLOW added on the last
/// component; a symlink there is resolved by the walk).
pub fn open_in_workspace(
    root: &str,
    path: &str,
    flags: libc::c_int,
    mode: libc::mode_t,
    create_parents: bool,
) -> Result<OwnedFd, PathError> {
    let parts = workspace_parts(root, path)?;
    let mut walk = Walk::new(root, path)?;
    let mut pending: VecDeque<String> = parts.into();
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            walk.up()?;
        } else if name == "." {
            continue;
        } else if !pending.is_empty() {
            walk.enter(&name, &mut pending, create_parents)?;
        } else {
            match openat(walk.here(), &name, flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode) {
                Ok(fd) => return Ok(fd),
                Err(e) if matches!(errno_of(&e), libc::ELOOP | libc::ENOTDIR) => {
                    if !walk.follow(&name, &mut pending)? {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Err(PathError::Os(io::Error::from_raw_os_error(libc::EISDIR)))
}
