//! A cap on connections from one network address (an IPv4 address or an IPv6 /64), so
//! one host minting fresh identities cannot take every connection slot. libp2p's own
//! limits count per peer id, which costs such a host nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::service::source_address;

/// Refused: too many connections from one address.
#[derive(Debug, thiserror::Error)]
#[error("{address} already holds {max} connections to this relay")]
pub(crate) struct TooManyFromAddress {
    address: IpAddr,
    max: usize,
}

/// Counts established connections by source address and refuses new inbound ones from
/// an address at its cap (relayed connections carry no address and are not counted).
pub(crate) struct Behaviour {
    max: usize,
    by_address: HashMap<IpAddr, usize>,
    of_connection: HashMap<ConnectionId, IpAddr>,
}

impl Behaviour {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            by_address: HashMap::new(),
            of_connection: HashMap::new(),
        }
    }

    fn check(&self, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        let Some(address) = source_address(remote) else {
            return Ok(());
        };
        if self.by_address.get(&address).copied().unwrap_or(0) >= self.max {
            return Err(ConnectionDenied::new(TooManyFromAddress {
                address,
                max: self.max,
            }));
        }
        Ok(())
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check(remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Checked again: several may have been pending at once.
        self.check(remote)?;
        if let Some(address) = source_address(remote) {
            *self.by_address.entry(address).or_default() += 1;
            self.of_connection.insert(id, address);
        }
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = event
            && let Some(address) = self.of_connection.remove(&closed.connection_id)
            && let Some(n) = self.by_address.get_mut(&address)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_address.remove(&address);
            }
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_at_its_cap_is_refused_until_one_closes() {
        let mut b = Behaviour::new(2);
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/4040".parse().unwrap();
        let from =
            |port: u16| -> Multiaddr { format!("/ip4/192.0.2.7/tcp/{port}").parse().unwrap() };
        let other: Multiaddr = "/ip4/198.51.100.1/tcp/9".parse().unwrap();
        let (c1, c2, c3) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
        );
        let peer = PeerId::random();
        assert!(
            b.handle_established_inbound_connection(c1, peer, &local, &from(1))
                .is_ok()
        );
        assert!(
            b.handle_established_inbound_connection(c2, peer, &local, &from(2))
                .is_ok()
        );
        assert!(
            b.handle_pending_inbound_connection(c3, &local, &from(3))
                .is_err()
        );
        assert!(
            b.handle_pending_inbound_connection(c3, &local, &other)
                .is_ok()
        );
        b.of_connection.remove(&c1);
        *b.by_address.get_mut(&IpAddr::from([192, 0, 2, 7])).unwrap() -= 1;
        assert!(
            b.handle_pending_inbound_connection(c3, &local, &from(3))
                .is_ok()
        );
    }
}
