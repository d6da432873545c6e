//! The integration tests of `pocketlm-server`, one module per concern, in one test binary (one link
//! instead of one per file).

mod limits;
mod openai_client;
mod server;
