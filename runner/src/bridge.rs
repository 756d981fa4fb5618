//! The slot's end of a bridge (atropos.sandbox.server.bridges): a listening TCP socket on the
//! slot's own loopback, handed to the server over a Unix socket (SCM_RIGHTS). The bytes never
//! pass through the runner, so a slot with a bridge still hibernates.

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::sys;

/// Listen on 127.0.0.1:`port` of this network namespace and pass the socket over `channel`; the
/// port it listens on (the one asked, or a free one for 0).
pub fn listen_and_hand_over(port: u16, channel: &str) -> io::Result<u16> {
    // std sets SO_REUSEADDR on Unix listeners and a backlog of 128, as the Python runner does
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let link = UnixStream::connect(channel)?;
    // never the runner stuck on a channel others of the slot crowd
    link.set_write_timeout(Some(Duration::from_secs(5)))?;
    send_fd(link.as_raw_fd(), listener.as_raw_fd())?;
    Ok(listener.local_addr()?.port())
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
