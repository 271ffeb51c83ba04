//! Compile-fail tests of `#[interface]`: every unsupported shape is rejected at its span with a
//! message that says what to write instead. `TRYBUILD=overwrite` rewrites the expected output.

#[test]
fn unsupported_shapes_are_compile_errors() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
