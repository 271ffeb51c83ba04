//! The user's code under the connection: calls made while encoding or decoding, panics
//! while encoding, and services and authorizers added while serving.

use super::*;

/// An argument whose encoding waits for a call another thread makes on the same connection,
/// as a slow write into the peer's memory makes its caller wait while it encodes.
struct WaitsForAnotherCall<'a>(&'a Connection);

impl serde::Serialize for WaitsForAnotherCall<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let other = self.0.clone();
        let len = std::thread::spawn(move || {
            let data = [5u8; 10];
            other.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), Some(Duration::from_secs(10)))
        })
        .join()
        .unwrap();
        assert_eq!(len.unwrap(), 10, "the other caller's reply was read");
        Bytes(&[1u8, 2, 3][..]).serialize(s)
    }
}

/// A lone caller encodes its message before it takes the reader role, so a caller whose
/// encoding takes long (a byte string written into a peer that makes the write wait) holds
/// up nobody else's reply.
#[test]
fn a_caller_still_encoding_does_not_hold_the_reader_role() {
    let (a, server) = skimmed();
    let len = a.call::<_, u64>(&SKIM, 2, &WaitsForAnotherCall(&a), None);
    assert_eq!(len.unwrap(), 3);
    a.close();
    server.join().unwrap().unwrap();
}

/// An argument whose encoding makes a call on the same connection from the same thread.
struct CallsWhenEncoded<'a>(&'a Connection);

impl serde::Serialize for CallsWhenEncoded<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let data = [5u8; 10];
        let len = self.0.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
        assert_eq!(len.unwrap(), 10, "the call made while encoding");
        Bytes(&[1u8, 2, 3][..]).serialize(s)
    }
}

std::thread_local! {
    /// The connection [`CallsWhenDecoded`] calls on.
    static DECODER_CALLS: std::cell::RefCell<Option<Connection>> =
        const { std::cell::RefCell::new(None) };
}

/// A reply whose decoding makes a call on the same connection from the same thread.
struct CallsWhenDecoded(u64, u64);

impl<'de> serde::Deserialize<'de> for CallsWhenDecoded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let len = u64::deserialize(d)?;
        let data = [6u8; 12];
        let connection = DECODER_CALLS.with(|c| c.borrow().clone()).unwrap();
        let inner = connection.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
        Ok(CallsWhenDecoded(len, inner.unwrap()))
    }
}

/// A thread reuses its encoding buffers and its receive frame from call to call. User code
/// that runs while they are in use (`Serialize` of an argument, `Deserialize` of a reply) may
/// itself call on the same thread: that call gets buffers of its own, and both calls get
/// their replies.
#[test]
fn a_call_made_while_encoding_or_decoding_gets_its_own_buffers() {
    let (a, server) = skimmed();
    let len = a.call::<_, u64>(&SKIM, 2, &CallsWhenEncoded(&a), None);
    assert_eq!(len.unwrap(), 3);
    DECODER_CALLS.with(|c| *c.borrow_mut() = Some(a.clone()));
    let data = [7u8; 5];
    let reply = a.call::<_, CallsWhenDecoded>(&SKIM, 2, &Bytes(&data[..]), None);
    DECODER_CALLS.with(|c| *c.borrow_mut() = None);
    let CallsWhenDecoded(outer, inner) = reply.unwrap();
    assert_eq!((outer, inner), (5, 12));
    // And the thread's own buffers still work afterwards.
    assert_eq!(
        a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..2]), None)
            .unwrap(),
        2
    );
    a.close();
    server.join().unwrap().unwrap();
}

/// An argument whose encoding panics, as user `Serialize` code may.
struct PanicsWhenEncoded;

impl serde::Serialize for PanicsWhenEncoded {
    fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
        panic!("this argument cannot be encoded");
    }
}

/// A call whose argument panics while encoded leaves the connection usable: it never took the
/// reader role (it takes it only once the message is encoded), so nobody waits for a reader
/// that is gone. (Found by a review: when the role came first, every later caller hung.)
#[test]
fn a_panic_while_encoding_leaves_the_connection_usable() {
    let (a, server) = skimmed();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.call::<_, u64>(&SKIM, 2, &PanicsWhenEncoded, None)
    }));
    assert!(panicked.is_err());
    let data = [9u8; 7];
    let len = a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), Some(Duration::from_secs(10)));
    assert_eq!(len.unwrap(), 7, "the next call is answered");
    a.close();
    server.join().unwrap().unwrap();
}

/// A call whose argument panics while encoded, after a byte string of it was placed in the
/// lane: the message is never sent, so the placement goes back (the lane idle, and nothing
/// counted as on its way out). It stayed the lane's for good: every later string went
/// through the socket, and `release_shared_memory` never gave the region back.
#[test]
fn a_panic_while_encoding_after_a_placement_gives_the_placement_back() {
    let (a, server) = skimmed();
    let data = [9u8; 4096];
    for _ in 0..2 {
        // The first goes inline (neither end has heard that the other reads lanes), the
        // second through the lane, which makes and announces the region.
        let len = a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
        assert_eq!(len.unwrap(), 4096);
    }
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.call::<_, u64>(&SKIM, 2, &(Bytes(&data[..]), PanicsWhenEncoded), None)
    }));
    assert!(panicked.is_err());
    assert!(
        !a.lane_is_busy(),
        "the placement of a message never sent is kept"
    );
    assert_eq!(a.release_shared_memory(), 64 << 10, "the region is kept");
    let len = a.call::<_, u64>(&SKIM, 2, &Bytes(&data[..]), None);
    assert_eq!(
        len.unwrap(),
        4096,
        "the next string goes through a new region"
    );
    assert_eq!(a.release_shared_memory(), 64 << 10);
    a.close();
    server.join().unwrap().unwrap();
}

/// A call on a connection that has ended fails with why it ended before its arguments are
/// encoded, so no byte string is copied into a region or written into the peer for nothing
/// (`PanicsWhenEncoded` would panic).
#[test]
fn an_ended_connection_fails_calls_before_encoding() {
    let (a, b) = Connection::pair().unwrap();
    drop(b);
    a.run().unwrap(); // reads the hang-up
    assert!(a.is_closed());
    let call = a.call::<_, u64>(&SKIM, 2, &PanicsWhenEncoded, None);
    assert!(matches!(call, Err(Error::Disconnected)), "{call:?}");
}

struct Pinger;

impl Service for Pinger {
    fn info(&self) -> &'static InterfaceInfo {
        &PINGER
    }
    fn handle(&self, call: &mut Call<'_>) -> Result<()> {
        call.reply(&9u32)
    }
}

/// A serving thread keeps a snapshot of what is served: a service or an authorizer added
/// while it serves must still reach the next request.
#[test]
fn services_and_authorizers_added_while_serving_take_effect() {
    let (a, b) = Connection::pair().unwrap();
    let (_open, server) = serve_gated(&b);
    assert_eq!(a.call::<_, u32>(&BULK, 2, &(), None).unwrap(), 7);
    b.add_service(Pinger);
    assert_eq!(a.call::<_, u32>(&PINGER, 1, &(), None).unwrap(), 9);
    b.set_authorizer(|_, iface, _| match iface.name {
        "Bulk" => Err("not today".into()),
        _ => Ok(()),
    });
    let refused = a.call::<_, u32>(&BULK, 2, &(), None);
    assert!(
        matches!(&refused, Err(Error::Refused(why)) if why == "not today"),
        "{refused:?}"
    );
    assert_eq!(a.call::<_, u32>(&PINGER, 1, &(), None).unwrap(), 9);
    a.close();
    server.join().unwrap().unwrap();
}
