//! Which service answers a request, and whether it may: the checks both flavours (blocking
//! and async) make before running an implementation, so they cannot drift apart.

use super::Authorizer;
use super::envelope::Envelope;
use super::failure::Failure;
use crate::service::InterfaceInfo;
use crate::socket::PeerCredentials;

/// Finds the service `envelope` names among `services` (`info` tells each one's interface)
/// and checks the call may run: the same interface signature on both ends, a command the
/// interface has, and the authorizer's consent. Otherwise says why, for the failure reply.
#[inline]
pub(crate) fn admit<'s, S>(
    services: &'s [S],
    info: impl Fn(&S) -> &'static InterfaceInfo,
    envelope: &Envelope,
    authorizer: Option<&Authorizer>,
    peer: Option<&PeerCredentials>,
) -> Result<&'s S, Failure> {
    let Some(service) = services.iter().find(|s| info(s).id == envelope.interface) else {
        return Err(Failure::NotServed(
            services.iter().map(|s| info(s).name.to_string()).collect(),
        ));
    };
    let iface = info(service);
    if iface.signature != envelope.signature {
        let methods = iface.methods.iter();
        return Err(Failure::Mismatch(
            methods
                .map(|m| (m.cmd, m.name.to_string(), m.signature.to_string()))
                .collect(),
        ));
    }
    if iface.method(envelope.cmd).is_none() {
        return Err(Failure::UnknownCommand(envelope.cmd));
    }
    if let Some(authorize) = authorizer {
        authorize(peer, iface, envelope.cmd).map_err(Failure::Refused)?;
    }
    Ok(service)
}
