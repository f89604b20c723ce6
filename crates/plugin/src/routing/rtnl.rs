//! One synchronous rtnetlink socket: a request and its replies (to ACK, error or DONE). Shared
//! with the sidecar's start-up checks, which read rules, routes and addresses the same way.

use super::RoutingError;
use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// One rtnetlink socket in the current netns.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, RoutingError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(RoutingError::Socket)?;
        sock.bind_auto().map_err(RoutingError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(RoutingError::Socket)?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends one request and collects replies until ACK/error (or DONE for dumps).
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, RoutingError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(RoutingError::Socket)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .sock
                .recv(&mut &mut rx[..], 0)
                .map_err(RoutingError::Socket)?;
            let mut off = 0;
            while off < n {
                let bytes = &rx[off..n];
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        RoutingError::Decode {
                            what: what.into(),
                            detail: e.to_string(),
                        }
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(RoutingError::Decode {
                        what: what.into(),
                        detail: "zero-length message".into(),
                    });
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(RoutingError::Kernel {
                                what: what.into(),
                                err: io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            continue;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub(super) fn create(
        &mut self,
        msg: RouteNetlinkMessage,
        what: &str,
    ) -> Result<(), RoutingError> {
        match self.request(msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, what) {
            Ok(_) => Ok(()),
            // Idempotent ADD: an identical object is already there.
            Err(RoutingError::Kernel { err, .. }) if err.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes; `Ok(false)` when the object was already absent.
    pub(super) fn remove(
        &mut self,
        msg: RouteNetlinkMessage,
        what: &str,
    ) -> Result<bool, RoutingError> {
        match self.request(msg, NLM_F_ACK, what) {
            Ok(_) => Ok(true),
            Err(RoutingError::Kernel { err, .. })
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ENOENT)
                        | Some(libc::ESRCH)
                        | Some(libc::EADDRNOTAVAIL)
                        | Some(libc::EAFNOSUPPORT)
                        | Some(libc::ENODEV)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
