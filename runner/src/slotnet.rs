//! `atropos-runner --slot-net ...`: a slot's network namespace linked to the server's hub, then
//! the slot's sandbox exec'd in it (the twin of the shell chain in atropos.sandbox.server.egress,
//! which the Python runner's servers use). Same steps, as system calls and netlink messages in one
//! process where the chain ran eight programs (nsenter, unshare, sh, ip four times, unshare): a
//! slot's start paid ~15 ms for them.
//!
//! 1. enter the hub's user namespace, whose root our uid is (nsenter --preserve-credentials);
//! 2. a new network namespace (owned by it), IPv6 off for its devices;
//! 3. a veth pair, made from inside the hub (its names resolve there): its end in the hub, `eth0`
//!    placed here by fd; addressed and up on both sides (one trip into the hub and back);
//! 4. the slot's routes: default via the hub, `prohibit` for every blocked prefix;
//! 5. a user namespace of its own mapping the server's uid and gid (unshare --map-user/--map-group);
//! 6. exec the command (bubblewrap).

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::check;

pub const FLAG: &str = "--slot-net";

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RTN_PROHIBIT: u8 = 8;

/// What the server asks for (atropos.sandbox.server.egress.Egress.wrap).
struct Plan {
    hub_user: String,
    hub_net: String,
    hub_dev: String,
    hub_addr: (Ipv4Addr, u8),
    addr: (Ipv4Addr, u8),
    gateway: Ipv4Addr,
    prohibit: Vec<(Ipv4Addr, u8)>,
    uid: u32,
    gid: u32,
    command: Vec<String>,
}

fn prefix(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("not ADDRESS/LENGTH: {text}"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("not an IPv4 address: {addr}"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|n| *n <= 32)
        .ok_or_else(|| format!("bad prefix length: {text}"))?;
    Ok((addr, len))
}

fn plan(args: &[String]) -> Result<Plan, String> {
    let split = args
        .iter()
        .position(|a| a == "--")
        .ok_or("no `--` before the command")?;
    let (options, command) = (&args[..split], args[split + 1..].to_vec());
    if command.is_empty() || !options.len().is_multiple_of(2) {
        return Err("usage: --slot-net (--OPTION VALUE)... -- COMMAND...".into());
    }
    let mut get = std::collections::HashMap::new();
    for pair in options.chunks(2) {
        get.insert(pair[0].as_str(), pair[1].as_str());
    }
    let need = |name: &str| get.get(name).copied().ok_or_else(|| format!("{name} is missing"));
    let (uid, gid) = need("--map")?.split_once(':').ok_or("--map UID:GID")?;
    let prohibit = need("--prohibit")?;
    Ok(Plan {
        hub_user: need("--hub-user")?.into(),
        hub_net: need("--hub-net")?.into(),
        hub_dev: need("--hub-dev")?.into(),
        hub_addr: prefix(need("--hub-addr")?)?,
        addr: prefix(need("--addr")?)?,
        gateway: need("--gateway")?
            .parse()
            .map_err(|_| "--gateway: not an IPv4 address")?,
        prohibit: prohibit
            .split(',')
            .filter(|p| !p.is_empty())
            .map(prefix)
            .collect::<Result<_, _>>()?,
        uid: uid.parse().map_err(|_| "--map: bad uid")?,
        gid: gid.parse().map_err(|_| "--map: bad gid")?,
        command,
    })
}

/// A netlink request being built: the header, the family's fixed part, then attributes.
struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(fixed);
        Message { buf, nests: Vec::new() }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        self.pad();
        self.buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self
    }

    fn text(&mut self, kind: u16, text: &str) -> &mut Self {
        let mut data = text.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    fn open(&mut self, kind: u16) -> &mut Self {
        self.pad();
        self.nests.push(self.buf.len());
        self.attr(kind, &[])
    }

    fn raw(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        self
    }

    fn close(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("a nest to close");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Send on `sock`, and the kernel's answer: Ok, or the errno it refused with.
    fn send(&mut self, sock: &OwnedFd) -> io::Result<()> {
        self.pad();
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: the buffer is valid for reads of its length
        let sent = unsafe { libc::send(sock.as_raw_fd(), self.buf.as_ptr().cast(), self.buf.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 4096];
        // SAFETY: the reply buffer is valid for writes of its length
        let got = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        if got < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
            return Err(io::Error::other("unexpected netlink answer"));
        }
        match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(-errno)),
        }
    }
}

fn ifinfo(index: i32, flags: u32, change: u32) -> Vec<u8> {
    let mut fixed = vec![0u8; 16]; // family AF_UNSPEC, type 0
    fixed[4..8].copy_from_slice(&index.to_ne_bytes());
    fixed[8..12].copy_from_slice(&flags.to_ne_bytes());
    fixed[12..16].copy_from_slice(&change.to_ne_bytes());
    fixed
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: socket with constant arguments
    let fd = check(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: a new fd owned by nobody else
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path
    let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: a new fd owned by nobody else
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn enter(ns: &OwnedFd, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: setns on an open namespace fd
    check(unsafe { libc::setns(ns.as_raw_fd(), kind) }).map(|_| ())
}

fn index_of(name: &str) -> io::Result<i32> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated name
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index as i32),
    }
}

/// `ip addr add ADDR/LEN dev INDEX` and `ip link set INDEX up`.
fn address_and_up(sock: &OwnedFd, index: i32, (addr, len): (Ipv4Addr, u8)) -> io::Result<()> {
    let mut fixed = vec![libc::AF_INET as u8, len, 0, 0];
    fixed.extend_from_slice(&(index as u32).to_ne_bytes());
    Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &fixed)
        .attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets())
        .send(sock)?;
    up(sock, index)
}

fn up(sock: &OwnedFd, index: i32) -> io::Result<()> {
    let flag = libc::IFF_UP as u32;
    Message::new(RTM_NEWLINK, 0, &ifinfo(index, flag, flag)).send(sock)
}

/// `ip route add [prohibit] DST/LEN [via GATEWAY]` in the main table.
fn route(sock: &OwnedFd, (dst, len): (Ipv4Addr, u8), via: Option<Ipv4Addr>) -> io::Result<()> {
    let kind = if via.is_some() { RTN_UNICAST } else { RTN_PROHIBIT };
    let fixed = [
        libc::AF_INET as u8,
        len,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        0,
        kind,
        0,
        0,
        0,
        0,
    ];
    let mut msg = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &fixed);
    if len > 0 {
        msg.attr(RTA_DST, &dst.octets());
    }
    if let Some(gateway) = via {
        msg.attr(RTA_GATEWAY, &gateway.octets());
    }
    msg.send(sock)
}

/// The veth pair, made from the hub: `hub_dev` here, `eth0` in the namespace of `slot_ns`.
fn veth(sock: &OwnedFd, hub_dev: &str, slot_ns: RawFd) -> io::Result<()> {
    Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifinfo(0, 0, 0))
        .text(IFLA_IFNAME, hub_dev)
        .open(IFLA_LINKINFO)
        .text(IFLA_INFO_KIND, "veth")
        .open(IFLA_INFO_DATA)
        .open(VETH_INFO_PEER)
        .raw(&ifinfo(0, 0, 0))
        .text(IFLA_IFNAME, "eth0")
        .attr(IFLA_NET_NS_FD, &slot_ns.to_ne_bytes())
        .close()
        .close()
        .close()
        .send(sock)
}

fn step<T>(what: &str, result: io::Result<T>) -> Result<T, String> {
    result.map_err(|e| format!("atropos-slot-net: {what}: {e}"))
}

fn link(plan: &Plan) -> Result<(), String> {
    let hub_user = step("the hub's user namespace", open(&plan.hub_user))?;
    let hub_net = step("the hub's network namespace", open(&plan.hub_net))?;
    step(
        "entering the hub's user namespace",
        enter(&hub_user, libc::CLONE_NEWUSER),
    )?;
    // SAFETY: unshare with a constant flag
    step(
        "a new network namespace",
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }),
    )?;
    let own_net = step("this network namespace", open("/proc/self/ns/net"))?;
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    let sock = step("netlink", netlink())?;
    // the hub's side, from inside the hub (names resolve there), then back here once
    step("entering the hub", enter(&hub_net, libc::CLONE_NEWNET))?;
    let hub_sock = step("netlink in the hub", netlink())?;
    let mut removals = 0;
    while let Err(failed) = veth(&hub_sock, &plan.hub_dev, own_net.as_raw_fd()) {
        if failed.raw_os_error() != Some(libc::EEXIST) || removals == 3 {
            return step("creating the slot's link", Err(failed));
        }
        removals += 1;
        // a link the slot's last sandbox left in the hub (its namespace not yet gone): removed; one
        // gone meanwhile (ENODEV: that namespace's teardown finished) is as good
        let removed = Message::new(RTM_DELLINK, 0, &ifinfo(0, 0, 0))
            .text(IFLA_IFNAME, &plan.hub_dev)
            .send(&hub_sock);
        if let Err(why) = removed {
            if why.raw_os_error() != Some(libc::ENODEV) {
                return step("removing the slot's old link", Err(why));
            }
        }
    }
    let hub_index = step("the hub's side of the link", index_of(&plan.hub_dev))?;
    step(
        "the hub's side of the link",
        address_and_up(&hub_sock, hub_index, plan.hub_addr),
    )?;
    step("leaving the hub", enter(&own_net, libc::CLONE_NEWNET))?;
    let index = step("the slot's side of the link", index_of("eth0"))?;
    step("the slot's side of the link", address_and_up(&sock, index, plan.addr))?;
    step("the slot's loopback", index_of("lo").and_then(|lo| up(&sock, lo)))?;
    step(
        "the slot's default route",
        route(&sock, (Ipv4Addr::UNSPECIFIED, 0), Some(plan.gateway)),
    )?;
    for &blocked in &plan.prohibit {
        step(
            &format!("refusing {}/{}", blocked.0, blocked.1),
            route(&sock, blocked, None),
        )?;
    }
    Ok(())
}

fn own_user(plan: &Plan) -> Result<(), String> {
    // SAFETY: getuid and getgid cannot fail; unshare with a constant flag
    let (outer_uid, outer_gid) = unsafe { (libc::getuid(), libc::getgid()) };
    step("a user namespace", check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }))?;
    step("setgroups", std::fs::write("/proc/self/setgroups", "deny"))?;
    step(
        "uid_map",
        std::fs::write("/proc/self/uid_map", format!("{} {outer_uid} 1", plan.uid)),
    )?;
    step(
        "gid_map",
        std::fs::write("/proc/self/gid_map", format!("{} {outer_gid} 1", plan.gid)),
    )
}

/// `--slot-net ... -- COMMAND...`: link, then exec COMMAND; returns only on failure.
pub fn main(args: &[String]) -> String {
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(why) => return format!("atropos-slot-net: {why}"),
    };
    if let Err(why) = link(&plan).and_then(|_| own_user(&plan)) {
        return why;
    }
    crate::cgjoin::exec(&plan.command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split(' ').map(String::from).collect()
    }

    #[test]
    fn a_plan_is_read_whole_or_refused_with_what_is_wrong() {
        let good = "--hub-user U --hub-net N --hub-dev s1 --hub-addr 198.18.0.5/30 --addr 198.18.0.6/30 \
                    --gateway 198.18.0.5 --prohibit 10.0.0.0/8,127.0.0.0/8 --map 1001:1001 -- bwrap --x";
        let plan = plan(&args(good)).expect("a good plan");
        assert_eq!(
            plan.prohibit,
            vec![(Ipv4Addr::new(10, 0, 0, 0), 8), (Ipv4Addr::new(127, 0, 0, 0), 8)]
        );
        assert_eq!((plan.uid, plan.gid, plan.command.len()), (1001, 1001, 2));
        assert!(super::plan(&args("--hub-user U bwrap")).is_err_and(|e| e.contains("--")));
        let missing = good.replace("--gateway 198.18.0.5 ", "");
        assert!(super::plan(&args(&missing)).is_err_and(|e| e.contains("--gateway is missing")));
        assert!(prefix("10.0.0.0/33").is_err() && prefix("10.0.0.0").is_err() && prefix("x/8").is_err());
    }
}
