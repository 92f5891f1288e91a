//! Who may connect to us: once the engine has said who our contacts are, an inbound
//! connection from anyone else is refused before any protocol runs on it (identify,
//! which would tell them our listen addresses, included). Until then (a network started
//! without an engine) everyone may.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use parking_lot::RwLock;

/// The peers allowed in, shared with the handles; `None` lets everyone in.
pub(super) type Allowed = Arc<RwLock<Option<HashSet<PeerId>>>>;

/// Refused: not one of our contacts.
#[derive(Debug, thiserror::Error)]
#[error("{0} is not a contact")]
struct NotAContact(PeerId);

/// Refuses inbound connections from peers not in the allowed set.
pub(super) struct Behaviour {
    allowed: Allowed,
}

impl Behaviour {
    pub(super) fn new(allowed: Allowed) -> Self {
        Self { allowed }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _id: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        match &*self.allowed.read() {
            Some(allowed) if !allowed.contains(&peer) => {
                Err(ConnectionDenied::new(NotAContact(peer)))
            }
            _ => Ok(dummy::ConnectionHandler),
        }
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

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

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
    fn only_contacts_come_in_once_they_are_known() {
        let allowed: Allowed = Arc::default();
        let mut gate = Behaviour::new(allowed.clone());
        let addr: Multiaddr = "/ip4/192.0.2.1/tcp/1".parse().unwrap();
        let (friend, stranger) = (PeerId::random(), PeerId::random());
        let id = ConnectionId::new_unchecked(1);
        let mut admit = |peer| {
            gate.handle_established_inbound_connection(id, peer, &addr, &addr)
                .is_ok()
        };
        assert!(admit(stranger), "no contacts known yet: open");
        *allowed.write() = Some([friend].into());
        assert!(admit(friend));
        assert!(!admit(stranger));
    }
}
