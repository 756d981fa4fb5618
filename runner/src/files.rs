//! `read_file` and `write_file` tools, confined to the slot's workspace (see pathsafe), and its
//! reset (the twin of atropos.sandbox.runner.files).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::outcome::{elapsed_ms, failed, Outcome};
use crate::pathsafe::{cstr, open_in_workspace, openat, PathError};
use crate::sys;

/// O_NONBLOCK: a FIFO planted in the workspace must not hang the runner; only regular files are used
const READ_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_NONBLOCK;
const WRITE_FLAGS: libc::c_int = libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK;

fn strerror(errno: i32) -> String {
    // SAFETY: strerror returns a pointer to a NUL-terminated static (or thread-local) string
    unsafe { CStr::from_ptr(libc::strerror(errno)) }
        .to_string_lossy()
        .into_owned()
}

fn os_error_message(path: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EISDIR) => format!("{path}: is a directory"),
        Some(libc::ENOENT) => format!("{path}: no such file"),
        Some(libc::ENOTDIR) => format!("{path}: a component of the path is not a directory"),
        Some(errno) => format!("{path}: {}", strerror(errno)),
        None => format!("{path}: {e}"),
    }
}

fn refusal(started: Instant, path: &str, e: PathError) -> Outcome {
    match e {
        PathError::Escape(why) => failed(started, &why),
        PathError::Os(e) => failed(started, &os_error_message(path, &e)),
    }
}

fn done(started: Instant, text: String) -> Outcome {
    let mut outcome = Outcome::new();
    outcome.insert("ok".into(), true.into());
    outcome.insert("output".into(), text.clone().into());
    outcome.insert("stdout".into(), text.into());
    outcome.insert("duration_ms".into(), elapsed_ms(started).into());
    outcome
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: st is fully written by a successful fstat
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        sys::check(libc::fstat(fd, &mut st))?;
        Ok(st)
    }
}

/// The size of a regular file; a directory or anything else (FIFO, device) is refused.
fn regular_file(fd: RawFd) -> io::Result<u64> {
    let st = fstat(fd)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        libc::S_IFREG => Ok(st.st_size as u64),
        _ => Err(io::Error::other("not a regular file")),
    }
}

enum Read {
    Data(Vec<u8>),
    Refused(String),
}

fn read_bytes(root: &str, path: &str, limit: u64) -> Result<Read, PathError> {
    let fd = open_in_workspace(root, path, READ_FLAGS, 0o666, false)?;
    let size = regular_file(fd.as_raw_fd())?;
    if size > limit {
        return Ok(Read::Refused(format!(
            "{path}: file is {size} bytes, over the read limit of {limit} bytes"
        )));
    }
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while data.len() as u64 <= limit {
        let want = ((limit + 1) as usize - data.len()).min(buf.len());
        let n = sys::read(fd.as_raw_fd(), &mut buf[..want])?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    if data.len() as u64 > limit {
        return Ok(Read::Refused(format!(
            "{path}: file grew past the read limit of {limit} bytes"
        )));
    }
    Ok(Read::Data(data))
}

pub fn read_file(root: &str, path: &str, base64: bool, max_bytes: Option<u64>, file_limit: u64) -> Outcome {
    let started = Instant::now();
    let limit = match max_bytes {
        Some(n) if n > 0 => n.min(file_limit),
        _ => file_limit,
    };
    let data = match read_bytes(root, path, limit) {
        Ok(Read::Data(data)) => data,
        Ok(Read::Refused(why)) => return failed(started, &why),
        Err(e) => return refusal(started, path, e),
    };
    if base64 {
        return done(started, b64::encode(&data));
    }
    match String::from_utf8(data) {
        Ok(text) => done(started, text),
        Err(_) => failed(
            started,
            &format!("{path}: not UTF-8 text; read it with encoding=base64"),
        ),
    }
}

fn write_bytes(root: &str, path: &str, data: &[u8], mode: Option<u32>) -> Result<(), PathError> {
    let fd = open_in_workspace(root, path, WRITE_FLAGS, 0o666, true)?;
    let raw = fd.as_raw_fd();
    regular_file(raw)?;
    // SAFETY: ftruncate and fchmod on an fd we hold
    sys::check(unsafe { libc::ftruncate(raw, 0) })?;
    sys::write_all(raw, data)?;
    if let Some(mode) = mode {
        // SAFETY: as above
        sys::check(unsafe { libc::fchmod(raw, mode as libc::mode_t) })?;
    }
    Ok(())
}

pub fn write_file(root: &str, path: &str, content: &str, base64: bool, mode: Option<u32>, limit: u64) -> Outcome {
    let started = Instant::now();
    let data = if base64 {
        match b64::decode(content) {
            Ok(data) => data,
            Err(why) => return failed(started, &format!("{path}: content is not valid base64 ({why})")),
        }
    } else {
        content.as_bytes().to_vec()
    };
    if data.len() as u64 > limit {
        return failed(
            started,
            &format!("{path}: {} bytes is over the write limit of {limit} bytes", data.len()),
        );
    }
    match write_bytes(root, path, &data, mode) {
        Ok(()) => done(started, format!("wrote {} bytes to {path}", data.len())),
        Err(e) => refusal(started, path, e),
    }
}

mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Strict, as Python's b64decode(validate=True): the alphabet only, and right padding.
    pub fn decode(text: &str) -> Result<Vec<u8>, &'static str> {
        let bytes = text.as_bytes();
        let body_len = bytes.iter().rposition(|&b| b != b'=').map(|p| p + 1).unwrap_or(0);
        let (body, padding) = bytes.split_at(body_len);
        let mut bits: u32 = 0;
        let mut count = 0;
        let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
        for &c in body {
            let Some(v) = ALPHABET.iter().position(|&a| a == c) else {
                return Err("Only base64 data is allowed");
            };
            bits = (bits << 6) | v as u32;
            count += 1;
            if count == 4 {
                out.extend_from_slice(&[(bits >> 16) as u8, (bits >> 8) as u8, bits as u8]);
                bits = 0;
                count = 0;
            }
        }
        match (count, padding.len()) {
            (0, 0) => {}
            (2, 2) => out.push((bits >> 4) as u8),
            (3, 1) => out.extend_from_slice(&[(bits >> 10) as u8, (bits >> 2) as u8]),
            (1, _) => {
                return Err(
                    "Invalid base64-encoded string: number of data characters cannot be 1 more than a multiple of 4",
                )
            }
            _ => return Err("Incorrect padding"),
        }
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip() {
            for data in [&b""[..], b"a", b"ab", b"abc", b"abcd\xff\x00"] {
                assert_eq!(super::decode(&super::encode(data)).unwrap(), data);
            }
            assert!(super::decode("YQ").is_err());
            assert!(super::decode("Y!==").is_err());
        }
    }
}

// --- reset: empty the workspace without following any symlink an agent left in it ---

const MAX_REMOVAL_DEPTH: usize = 64;
const MAX_REMOVAL_PASSES: usize = 100_000; // each pass removes 64 levels of every deep chain

/// The names in directory `fd` (without . and ..).
fn list_dir(fd: RawFd) -> io::Result<Vec<CString>> {
    let dup = openat(fd, ".", libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
    // SAFETY: fdopendir takes ownership of the fd it is given; closedir releases both
    let dir = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    let mut names = Vec::new();
    loop {
        // SAFETY: dir is a valid open DIR stream until closedir below
        let entry = unsafe { libc::readdir(dir) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated in a valid dirent
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: closes the stream and its fd
    unsafe { libc::closedir(dir) };
    Ok(names)
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A readable fd of directory `name` (made searchable if an agent locked it), never via a symlink.
fn open_dir_for_removal(parent: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat/fchmodat with a valid name; the fd returned is ours alone
    let mut fd = unsafe { libc::openat(parent, name.as_ptr(), flags) };
    if fd < 0 && matches!(last_errno(), libc::EACCES | libc::EPERM) {
        // an agent's `chmod 000 dir`: never following a symlink here
        sys::check(unsafe { libc::fchmodat(parent, name.as_ptr(), 0o700, libc::AT_SYMLINK_NOFOLLOW) })?;
        fd = unsafe { libc::openat(parent, name.as_ptr(), flags) };
    }
    sys::check(fd)?;
    // SAFETY: just opened
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // writable, so its entries can be removed
    sys::check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) })?;
    Ok(fd)
}

struct Removal<'a> {
    root: RawFd, // deep directories are moved up to it and removed in a later pass
    depth: usize,
    moved: &'a mut Vec<String>, // the names they got there
}

fn remove_one(parent: RawFd, cname: &CStr, how: &mut Removal<'_>) -> io::Result<()> {
    for _ in 0..8 {
        // the entry may change type under us only while something still runs
        // SAFETY: unlinkat/renameat/openat with valid names and fds
        if unsafe { libc::unlinkat(parent, cname.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        match last_errno() {
            libc::ENOENT => return Ok(()),
            libc::EISDIR | libc::EPERM => {}
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
        if how.depth >= MAX_REMOVAL_DEPTH {
            // bounded recursion and open fds whatever an agent's `mkdir -p` depth: flatten the tree
            let flat = format!(".atropos-deep-{}", sys::random_hex(16));
            let cflat = cstr(&flat)?;
            sys::check(unsafe { libc::renameat(parent, cname.as_ptr(), how.root, cflat.as_ptr()) })?;
            how.moved.push(flat);
            return Ok(());
        }
        let fd = match open_dir_for_removal(parent, cname) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)) => continue,
            Err(e) => return Err(e),
        };
        let mut inner = Removal {
            root: how.root,
            depth: how.depth + 1,
            moved: &mut *how.moved,
        };
        remove_entries(fd.as_raw_fd(), &mut inner)?;
        drop(fd);
        sys::check(unsafe { libc::unlinkat(parent, cname.as_ptr(), libc::AT_REMOVEDIR) })?;
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!("cannot remove {cname:?}: it keeps changing"),
    ))
}

fn remove_entries(dir: RawFd, how: &mut Removal<'_>) -> io::Result<()> {
    for name in list_dir(dir)? {
        remove_one(dir, &name, how)?;
    }
    Ok(())
}

/// Remove everything under `root` (a bind mount point, so `root` itself stays).
pub fn empty_dir(root: &str) -> io::Result<()> {
    let fd = openat(
        libc::AT_FDCWD,
        root,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    let raw = fd.as_raw_fd();
    for _ in 0..MAX_REMOVAL_PASSES {
        let mut moved = Vec::new();
        if list_dir(raw)?.is_empty() {
            return Ok(());
        }
        remove_entries(
            raw,
            &mut Removal {
                root: raw,
                depth: 0,
                moved: &mut moved,
            },
        )?;
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!("cannot empty {root}: entries keep appearing"),
    ))
}
