//! One module per subcommand, plus the shared model/sampling arguments.

pub mod bench;
pub mod cache;
pub mod chat;
pub mod convert;
pub mod embed;
pub mod fuse;
pub mod generate;
pub mod gpu;
pub mod lora;
pub mod model;
pub mod perplexity;
pub mod serve;
