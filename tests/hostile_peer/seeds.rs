//! Seeds: valid messages, captured.

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::OFlag;
use typed_ipc::{Connection, Frame, Listener, Server, Socket};

use crate::budget::PATIENCE;
use crate::common;
use crate::{
    CMD_BYTES, CMD_NOTE, CMD_PING, CMD_RECORD, Impl, Record, TARGET_INFO, TargetClient,
    TargetServer,
};

/// A message as it went over the wire: payload (envelope first) and fds.
pub(crate) struct Seed {
    pub(crate) name: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

impl Seed {
    fn capture(name: &str, frame: &Frame) -> Seed {
        Seed {
            name: name.to_string(),
            payload: frame.payload.clone(),
            fds: frame.fds.iter().map(|fd| fd.try_clone().unwrap()).collect(),
        }
    }
    pub(crate) fn cmd(&self) -> u32 {
        u32::from_le_bytes(self.payload[4..8].try_into().unwrap())
    }
}

/// Valid calls (and oneways) of a real client, and the real server's replies to them.
pub(crate) struct Seeds {
    pub(crate) calls: Vec<Seed>,
    pub(crate) replies: Vec<Seed>,
}

/// Relays a real client's calls to a real server and records both directions: valid
/// messages of every shape, lane placements (regions, a pipe) included.
pub(crate) fn capture_seeds() -> Seeds {
    for (cmd, name) in [
        (CMD_BYTES, "bytes"),
        (CMD_RECORD, "record"),
        (CMD_NOTE, "note"),
        (CMD_PING, "ping"),
    ] {
        assert_eq!(TARGET_INFO.method(cmd).map(|m| m.name), Some(name));
    }
    let (client_end, relay_client) = Socket::pair().unwrap();
    let (relay_server, server_end) = Socket::pair().unwrap();
    // The server trusts its client with pipes (so that the client's calls may pipe), and
    // says so first.
    let server_end = Connection::new(server_end);
    server_end.lend_pages_to_peer(true);
    let server = std::thread::spawn(move || server_end.serve(TargetServer::new(Impl)));
    send_frame(&relay_client, &relay_server.recv_timeout(PATIENCE).unwrap());
    let client = TargetClient::new(Connection::new(client_end)).with_timeout(PATIENCE);
    let (mut calls, mut replies) = (Vec::new(), Vec::new());
    let mut relay = |name: &str, call: &(dyn Fn(&TargetClient) + Sync), oneway: bool| {
        std::thread::scope(|s| {
            let caller = s.spawn(|| call(&client));
            let frame = relay_client.recv_timeout(PATIENCE).unwrap();
            calls.push(Seed::capture(name, &frame));
            send_frame(&relay_server, &frame);
            if !oneway {
                let reply = relay_server.recv_timeout(PATIENCE).unwrap();
                replies.push(Seed::capture(name, &reply));
                send_frame(&relay_client, &reply);
            }
            caller.join().unwrap();
        });
    };
    let memfd = || common::memfd(b"seed");
    let record = |blob: usize| Record {
        name: "frame-17".into(),
        blob: vec![0x5a; blob],
        file: memfd(),
        extra: Some(7),
        tags: vec!["a".into(), "bc".into()],
    };
    relay("ping", &|c| assert_eq!(c.ping(41).unwrap(), 42), false);
    relay(
        "text",
        &|c| drop(c.text("hello, hostile world".into()).unwrap()),
        false,
    );
    relay(
        "long text",
        &|c| drop(c.text("é".repeat(1500)).unwrap()),
        false,
    );
    relay(
        "small bytes",
        &|c| drop(c.bytes(vec![1; 16]).unwrap()),
        false,
    );
    relay(
        "files",
        &|c| {
            let pipe = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap().0;
            c.files(vec![memfd(), pipe], Some("label".into())).unwrap();
        },
        false,
    );
    relay(
        "no files",
        &|c| assert_eq!(c.files(vec![], None).unwrap(), 0),
        false,
    );
    relay("one", &|c| drop(c.one(memfd()).unwrap()), false);
    relay(
        "maybe some",
        &|c| drop(c.maybe(Some(memfd())).unwrap()),
        false,
    );
    relay("maybe none", &|c| drop(c.maybe(None).unwrap()), false);
    relay(
        "small record",
        &|c| drop(c.record(record(3)).unwrap()),
        false,
    );
    // From here on the client knows the server reads lanes: large byte strings are placed.
    relay(
        "placed bytes, region announced",
        &|c| drop(c.bytes(vec![2; 4096]).unwrap()),
        false,
    );
    relay(
        "placed bytes",
        &|c| drop(c.bytes(vec![3; 8192]).unwrap()),
        false,
    );
    relay(
        "placed record",
        &|c| drop(c.record(record(2048)).unwrap()),
        false,
    );
    relay("note", &|c| c.note(1, vec![4; 8]).unwrap(), true);
    relay(
        "ping after note",
        &|c| assert_eq!(c.ping(1).unwrap(), 2),
        false,
    );
    relay("placed note", &|c| c.note(2, vec![5; 3000]).unwrap(), true);
    relay(
        "ping after placed note",
        &|c| assert_eq!(c.ping(2).unwrap(), 3),
        false,
    );
    relay(
        "fragmented text",
        &|c| drop(c.text("x".repeat(100 << 10)).unwrap()),
        false,
    );
    client.connection().lend_pages_to_peer(true);
    // Which it tells the server first, in an announcement that gets no reply.
    send_frame(&relay_server, &relay_client.recv_timeout(PATIENCE).unwrap());
    relay(
        "piped bytes",
        &|c| drop(c.bytes(vec![7; 200 << 10]).unwrap()),
        false,
    );
    // The region given back: an announcement that gets no reply. The next placement
    // announces a new region.
    relay(
        "region given back",
        &|c| assert_eq!(c.connection().release_shared_memory(), 64 << 10),
        true,
    );
    relay(
        "placed bytes, new region announced",
        &|c| drop(c.bytes(vec![8; 5000]).unwrap()),
        false,
    );
    drop((client, relay_client, relay_server));
    server.join().unwrap().unwrap();
    let tagged = |calls: &[Seed], tag: u8| {
        calls
            .iter()
            .any(|s| s.cmd() == CMD_BYTES && s.payload.get(24) == Some(&tag))
    };
    assert!(
        tagged(&calls, 0) && tagged(&calls, 1) && tagged(&calls, 2),
        "the seeds cover tags 0-2"
    );
    // An end's last words, which either end may send: last, so that a valid reply is
    // still found first by its command id.
    for refusal in refusals() {
        replies.push(Seed {
            name: refusal.name.clone(),
            payload: refusal.payload.clone(),
            fds: Vec::new(),
        });
        calls.push(refusal);
    }
    Seeds { calls, replies }
}

/// The refusals a listener's `admit` sends the clients it turns away, as they receive them:
/// a short reason, and one cut at its most bytes.
fn refusals() -> Vec<Seed> {
    let name = format!("typed-ipc-hostile-peer-refusals-{}", std::process::id());
    let reasons = ["not you".to_string(), "é".repeat(3000)];
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let serving = Server::new()
        .service(TargetServer::new(Impl))
        .admit(move |_| {
            let n = asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(reasons[n % 2].clone())
        })
        .listen(Listener::bind_abstract(&name).unwrap())
        .unwrap();
    let seeds = ["refusal", "long refusal"]
        .iter()
        .map(|what| {
            let client = Socket::connect_abstract(&name).unwrap();
            Seed::capture(what, &client.recv_timeout(PATIENCE).unwrap())
        })
        .collect();
    serving.shutdown();
    seeds
}

fn send_frame(socket: &Socket, frame: &Frame) {
    let fds: Vec<_> = frame.fds.iter().map(|fd| fd.as_fd()).collect();
    socket.send_timeout(&frame.payload, &fds, PATIENCE).unwrap();
}
