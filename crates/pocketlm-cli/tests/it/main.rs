//! The integration tests of `pocketlm-cli`, one module per concern, in one test binary (one link
//! instead of one per file).

mod chat_interrupt;
mod cli;
mod cli_folders;
mod embed;
mod sampling_defaults;
