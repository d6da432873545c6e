//! The integration tests of `pocketlm-server`, one module per concern, in one test binary (one link
//! instead of one per file).

mod embeddings;
mod limits;
mod openai_client;
mod prefix_cache;
mod server;
mod tools;

/// Starts a server with `config` and the real default model on a free loopback port, in a
/// background thread with its own runtime; returns the address it listens on.
pub(crate) fn start_server(config: pocketlm_server::ServerConfig) -> std::net::SocketAddr {
    start_server_with(pocketlm_testutil::default_model(false), config)
}

/// Starts a server with `config` and model `m` on a free loopback port (see [`start_server`]).
pub(crate) fn start_server_with(
    m: std::sync::Arc<pocketlm::loader::LoadedModel>,
    config: pocketlm_server::ServerConfig,
) -> std::net::SocketAddr {
    spawn_server(m, config, std::future::pending()).0
}

/// Starts a server with `config` and model `m` on a free loopback port, in a background thread
/// with its own runtime, that shuts down when `shutdown` completes; returns the address it
/// listens on and the thread (which ends once the server, and so its engine, is dropped).
pub(crate) fn spawn_server(
    m: std::sync::Arc<pocketlm::loader::LoadedModel>,
    config: pocketlm_server::ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback");
            tx.send(listener.local_addr().expect("local addr"))
                .expect("send addr");
            pocketlm_server::serve(
                listener,
                pocketlm_server::router(m, &config),
                config.timeouts,
                shutdown,
            )
            .await
            .expect("serve");
        });
    });
    (rx.recv().expect("server address"), thread)
}
