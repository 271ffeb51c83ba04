//! Sequence numbers: a new placement never takes the number the peer last acknowledged.

use super::*;

#[test]
fn a_new_placement_never_takes_the_number_the_peer_last_acknowledged() {
    let (busy, peer_done) = (AtomicU32::new(0), AtomicU32::new(0));
    let mut out = Outgoing::default();
    assert_eq!(out.start(&busy, &peer_done), 1);
    // The peer still reports 5 as done with (say 2,046 placements since were never
    // sent): 5 is skipped, or that old acknowledgement would release the new one.
    out.last_seq = 4;
    peer_done.store(5, Ordering::Relaxed);
    assert_eq!(out.start(&busy, &peer_done), 6);
    assert_eq!(busy.load(Ordering::Relaxed), 6);
    // Also where the numbers wrap.
    out.last_seq = SEQ_MASK;
    peer_done.store(1, Ordering::Relaxed);
    assert_eq!(out.start(&busy, &peer_done), 2);
}
