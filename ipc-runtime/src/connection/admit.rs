//! Which service answers a request, and whether it may: the checks both flavours (blocking
//! and async) make before running an implementation, so they cannot drift apart.

use std::panic::{AssertUnwindSafe, catch_unwind};

use super::Authorizer;
use super::envelope::Envelope;
use super::failure::Failure;
use crate::service::InterfaceInfo;
use crate::socket::PeerCredentials;

/// Finds the service `envelope` names among `services` (`info` tells each one's interface)
/// and checks the call may run: the authorizer's consent, the same interface signature on
/// both ends, and a command the interface has. Otherwise says why, for the failure reply.
///
/// With an authorizer, a caller learns what this side serves only once it is let in: the
/// authorizer runs before the signatures are compared, and a caller naming an interface not
/// served, or a command the authorizer could not be asked about, learns no names.
#[inline]
pub(crate) fn admit<'s, S>(
    services: &'s [S],
    info: impl Fn(&S) -> &'static InterfaceInfo,
    envelope: &Envelope,
    authorizer: Option<&Authorizer>,
    peer: Option<&PeerCredentials>,
) -> Result<&'s S, Failure> {
    let Some(service) = services.iter().find(|s| info(s).id == envelope.interface) else {
        let served = match authorizer {
            Some(_) => Vec::new(),
            None => services.iter().map(|s| info(s).name.to_string()).collect(),
        };
        return Err(Failure::NotServed(served));
    };
    let iface = info(service);
    // The authorizer is only asked about commands the interface has.
    let known = iface.method(envelope.cmd).is_some();
    if let (Some(authorize), true) = (authorizer, known) {
        // User code, as a handler is: a panic refuses this request, and must not unwind
        // through the serving thread or task (which would leave the request unanswered and
        // a oneway marked running for good, so that nothing after it ran).
        let asked = catch_unwind(AssertUnwindSafe(|| authorize(peer, iface, envelope.cmd)));
        asked
            .unwrap_or_else(|_| Err("the authorizer panicked".into()))
            .map_err(Failure::Refused)?;
    }
    if iface.signature != envelope.signature {
        let methods = match (authorizer, known) {
            (Some(_), false) => Vec::new(),
            _ => iface
                .methods
                .iter()
                .map(|m| (m.cmd, m.name.to_string(), m.signature.to_string(), m.shape))
                .collect(),
        };
        return Err(Failure::Mismatch(methods));
    }
    if !known {
        return Err(Failure::UnknownCommand(envelope.cmd));
    }
    Ok(service)
}
