//! The slot's end of a bridge (atropos.sandbox.server.bridges): a listening TCP socket on the
//! slot's own loopback, handed to the server over a Unix socket (SCM_RIGHTS). The bytes never
//! pass through the runner, so a slot with a bridge still hibernates.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::sys;

/// Listen on 127.0.0.1:`port` of this network namespace and pass the socket over `channel`; the
/// port it listens on (the one asked, or a free one for 0).
pub fn listen_and_hand_over(port: u16, channel: &str) -> io::Result<u16> {
    // std sets SO_REUSEADDR on Unix listeners and a backlog of 128, as the Python runner does
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let link = connect_within(channel, LINK_TIMEOUT)?;
    link.set_write_timeout(Some(LINK_TIMEOUT))?;
    send_fd(link.as_raw_fd(), listener.as_raw_fd())?;
    Ok(listener.local_addr()?.port())
}

/// never the runner stuck on a channel others of the slot crowd (a full backlog blocks a connect)
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the Unix socket `path`, tried until `timeout` while its backlog is full.
fn connect_within(path: &str, timeout: Duration) -> io::Result<UnixStream> {
    let address = path_address(path)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: a new socket of ours; connect with a sockaddr_un of the right length
        let fd = sys::check(unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: just made, owned by nobody else
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let size = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: address is a valid sockaddr_un for the call
        let rc = unsafe { libc::connect(fd, (&address as *const libc::sockaddr_un).cast(), size) };
        let error = io::Error::last_os_error();
        if rc == 0 {
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        if error.raw_os_error() != Some(libc::EAGAIN) || std::time::Instant::now() >= deadline {
            return Err(error);
        }
        std::thread::sleep(Duration::from_millis(10)); // the server accepts meanwhile
    }
}

fn path_address(path: &str) -> io::Result<libc::sockaddr_un> {
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below, NUL-terminated
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Ok(address)
}

fn send_fd(link: i32, fd: i32) -> io::Result<()> {
    let mut data = *b"L";
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation; the buffer below is sized by it
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr and its control message are built in buffers that live across sendmsg
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        sys::check(libc::sendmsg(link, &msg, 0) as libc::c_int)?;
    }
    Ok(())
}
