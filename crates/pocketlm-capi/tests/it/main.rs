//! Integration tests of the C API (one test binary for the crate): the committed header, the C
//! example built with `cc` against the library, error paths called directly, and the Python
//! package (`bindings/python`) built and tested in a venv.

mod c_example;
mod embed;
mod errors;
mod header;
mod python;
