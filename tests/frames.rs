//! The double-buffered frames of `examples/frames.rs`, run across real processes: one
//! shared region sent once, frames written into alternate halves while the worker reads the
//! other, every summary the worker returns equal to the parent's; and the worker's refusals
//! of a frame outside the region, out of line, or whose header is not its number.

mod common;

#[path = "../examples/frames.rs"]
#[allow(dead_code)]
mod frames;

use std::time::Duration;

use frames::{Analyst, Analyzer, FRAME_LEN, FrameError, run_parent, run_worker};
use typed_ipc::shared_region::SharedRegion;
use typed_ipc::worker::Exit;

/// The worker process: this test binary, re-run.
#[test]
#[ignore = "run as a child process by other tests"]
fn frames_worker() {
    run_worker().unwrap();
}

#[test]
fn every_frame_through_one_double_buffered_region_is_summarised_right() {
    // A hang guard, no timing assertion: the frames take well under a second.
    let _guard = common::abort_after("the frames example", Duration::from_secs(120));
    let report = run_parent(common::child("frames_worker"), 7).unwrap();
    let numbers: Vec<u32> = report.frames.iter().map(|&(n, _)| n).collect();
    assert_eq!(numbers, (0..7).collect::<Vec<_>>(), "{report:?}");
    assert!(report.frames.iter().all(|&(_, ok)| ok), "{report:?}");
    assert_eq!(report.exit, Exit::Code(0), "{report:?}");
}

#[test]
fn the_worker_refuses_a_frame_it_cannot_read_whole_or_whose_header_is_not_its_number() {
    let analyst = Analyst::default();
    assert_eq!(analyst.process(0, 0, 16), Err(FrameError::NotAttached));
    let mut region = SharedRegion::new(2 * FRAME_LEN).unwrap();
    analyst.attach(region.view().unwrap()).unwrap();
    let again = analyst.attach(region.view().unwrap());
    assert_eq!(again, Err(FrameError::AlreadyAttached));

    let end = region.len() as u64;
    for (offset, len) in [
        (end, 8),
        (end - 8, 16),
        (4, 16),
        (0, 12),
        (u64::MAX - 7, 16),
    ] {
        let refused = analyst.process(0, offset, len);
        assert_eq!(refused, Err(FrameError::OutOfBounds), "{offset}+{len}");
    }
    assert_eq!(analyst.process(0, 8, 0), Err(FrameError::OutOfBounds));

    region[..8].copy_from_slice(&3u64.to_ne_bytes());
    region[8..16].copy_from_slice(&[0x10; 8]);
    let wrong = analyst.process(2, 0, 16);
    assert_eq!(wrong, Err(FrameError::WrongHeader(3)));
    let summary = analyst.process(3, 0, 16).unwrap();
    assert_eq!((summary.sum, summary.histogram[1]), (0x80, 8));
}
