//! Compile-fail tests of async interfaces (`TRYBUILD=overwrite` rewrites the expected output).
//! Which cases run depends on the `tokio` feature, as trybuild builds them with the features
//! this test was built with: with it, `tests/ui_async/`; without it, `tests/ui_no_tokio/`
//! (`cargo test -p typed-ipc --test async_ui`), where an async interface is one clear error.
//! The shapes both flavours refuse, and mixing `fn` with `async fn`, are in `tests/ui/`.

#[cfg(feature = "tokio")]
#[test]
fn async_interfaces_refuse_what_cannot_work() {
    trybuild::TestCases::new().compile_fail("tests/ui_async/*.rs");
}

#[cfg(not(feature = "tokio"))]
#[test]
fn async_interfaces_need_the_tokio_feature() {
    trybuild::TestCases::new().compile_fail("tests/ui_no_tokio/*.rs");
}
