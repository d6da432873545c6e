//! A prefix cache across requests (SGLang's RadixAttention, vLLM's automatic prefix caching):
//! the keys and values of token sequences already computed, kept in a radix tree of fixed-size
//! token blocks, so that a new prompt starting with a cached prefix (a shared system prompt,
//! the previous turns of a chat) prefills only the rest.
//!
//! - The tree's edges are runs of whole blocks of [`PrefixCacheConfig::block_size`] tokens;
//!   each node holds, for every layer, the keys and values of its run
//!   (`[1, kv_heads, run, head_dim]`, the dtype the cache's [`LayerKvCache::state`] gives:
//!   f32 on CPU). A node is split at a block boundary when a new sequence diverges inside it.
//! - [`PrefixCache::lookup`] builds a cache holding the longest cached block-aligned prefix of
//!   a prompt, never the whole prompt (at least one token is left to prefill, for its logits).
//! - [`PrefixCache::insert`] adds a finished sequence's tokens (prompt and generated tokens
//!   fed to the model, so that the next turn of a chat re-uses this one).
//! - Memory: at most [`PrefixCacheConfig::max_bytes`] of keys and values; beyond it the least
//!   recently used leaves are evicted (a lookup or insert touches every node of its path).
//! - Only caches whose prefixes can be cut out are cached ([`KvCache::sliceable`]: the growing
//!   float cache, f32 or f16 storage). Rotating (sliding-window) and quantized caches, and
//!   prompts with images (multimodal RoPE), are neither looked up nor inserted.
//!
//! Persistence ([`PrefixCache::save`], [`PrefixCache::load`]): one safetensors file,
//! `prefix-cache.safetensors` in the cache directory, written to a temporary file beside it
//! and renamed over it. Tensors `nodes.{j}.layers.{i}.keys` / `.values` for node `j` (nodes
//! numbered so that a parent comes before its children) and layer `i`; string metadata:
//! - `format` = `pocketlm.prefix_cache`, `format_version` = `1`;
//! - `model.path`, `model.size`, `model.architecture`: the model's
//!   [`ModelIdentity`]; a file of another model is refused (left alone, not loaded);
//! - `block_size`, `n_layers`;
//! - `nodes`: a JSON array, entry `j` = `{"parent": p, "tokens": [...], "last_used": t}` with
//!   `p` the parent's index or -1 for a child of the root, `tokens` the node's run of token
//!   ids (a multiple of `block_size`), `t` its LRU clock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::kv_cache::{KvCache, LayerKvCache};
use crate::models::CausalLM;
use crate::prompt_cache::ModelIdentity;
use crate::{Error, Result};

const FORMAT: &str = "pocketlm.prefix_cache";
const FORMAT_VERSION: &str = "1";
/// The file name in the cache directory.
pub const FILE_NAME: &str = "prefix-cache.safetensors";

/// The prefix cache's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheConfig {
    /// Tokens per block: prefixes are matched and cached in whole blocks. At least 1;
    /// default 16.
    pub block_size: usize,
    /// Most bytes of keys and values held; least recently used leaves are evicted beyond it.
    /// Default 1 GiB.
    pub max_bytes: usize,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            max_bytes: 1 << 30,
        }
    }
}

/// One node: a run of whole blocks after its parent's.
#[derive(Debug, Clone)]
struct Node {
    parent: usize,
    /// The run's token ids (a multiple of the block size; empty for the root).
    tokens: Vec<u32>,
    /// Per layer: keys and values `[1, kv_heads, tokens.len(), head_dim]`.
    kv: Vec<(Tensor, Tensor)>,
    /// Children by the token ids of their first block.
    children: HashMap<Vec<u32>, usize>,
    last_used: u64,
    bytes: usize,
}

impl Node {
    fn new(parent: usize, tokens: Vec<u32>, kv: Vec<(Tensor, Tensor)>, clock: u64) -> Self {
        let bytes = kv
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        Self {
            parent,
            tokens,
            kv,
            children: HashMap::new(),
            last_used: clock,
            bytes,
        }
    }
}

/// What [`PrefixCache::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// No cache file in the directory: the cache starts empty.
    Missing,
    /// The file was loaded: its nodes and the tokens they hold (after eviction to the budget).
    Loaded {
        /// Nodes kept.
        nodes: usize,
        /// Tokens held by them.
        tokens: usize,
    },
    /// The file was refused (another model, another format, a damaged file): the cache starts
    /// empty, and the reason names the file and the field.
    Refused(String),
}

/// The radix tree of cached blocks; see the module documentation.
#[derive(Debug)]
pub struct PrefixCache {
    config: PrefixCacheConfig,
    /// Arena; index 0 is the root (no tokens, no keys/values).
    nodes: Vec<Option<Node>>,
    free: Vec<usize>,
    bytes: usize,
    clock: u64,
    /// Changed since the last [`Self::snapshot`].
    dirty: bool,
    /// Layers of the caches inserted (all must agree).
    n_layers: Option<usize>,
}

impl PrefixCache {
    /// An empty cache; `config.block_size` is raised to 1.
    pub fn new(config: PrefixCacheConfig) -> Self {
        Self {
            config: PrefixCacheConfig {
                block_size: config.block_size.max(1),
                ..config
            },
            nodes: vec![Some(Node::new(0, Vec::new(), Vec::new(), 0))],
            free: Vec::new(),
            bytes: 0,
            clock: 0,
            dirty: false,
            n_layers: None,
        }
    }

    /// The bounds in use.
    pub fn config(&self) -> PrefixCacheConfig {
        self.config
    }

    /// Bytes of keys and values held.
    pub fn nbytes(&self) -> usize {
        self.bytes
    }

    /// Nodes held (the root not counted).
    pub fn n_nodes(&self) -> usize {
        self.nodes.iter().flatten().count() - 1
    }

    /// Tokens held over all nodes (a token shared by several cached sequences counts once).
    pub fn n_tokens(&self) -> usize {
        self.nodes.iter().flatten().map(|n| n.tokens.len()).sum()
    }

    /// Whether the tree changed since the last [`Self::snapshot`] (or since it was made).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("a live prefix-cache node")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("a live prefix-cache node")
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn add(&mut self, node: Node) -> usize {
        self.bytes += node.bytes;
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    /// Whole blocks of `run` equal to those of `ids`, in tokens.
    fn matching(&self, run: &[u32], ids: &[u32]) -> usize {
        let b = self.config.block_size;
        run.chunks(b)
            .zip(ids.chunks(b))
            .take_while(|(x, y)| x.len() == b && x == y)
            .count()
            * b
    }

    /// The path of nodes matching `ids` in whole blocks: `(node, tokens of it matched)`, and
    /// the total matched; touches them.
    fn walk(&mut self, ids: &[u32]) -> (Vec<(usize, usize)>, usize) {
        let b = self.config.block_size;
        let now = self.tick();
        let mut path = Vec::new();
        let (mut node, mut pos) = (0usize, 0usize);
        while pos + b <= ids.len() {
            let Some(&child) = self.node(node).children.get(&ids[pos..pos + b]) else {
                break;
            };
            let m = self.matching(&self.node(child).tokens, &ids[pos..]);
            self.node_mut(child).last_used = now;
            path.push((child, m));
            pos += m;
            if m < self.node(child).tokens.len() {
                break;
            }
            node = child;
        }
        (path, pos)
    }

    /// Fills `cache` (empty, of the model the cached sequences came from) with the longest
    /// cached block-aligned prefix of `ids` that leaves at least one token of `ids` out, and
    /// returns its length in tokens (prefill `ids[returned..]` next). Returns 0 and leaves the
    /// cache empty when nothing matches or the cache is not [`KvCache::sliceable`].
    ///
    /// Errors: [`Error::InvalidArgument`] when `cache` is not empty or has another layer
    /// count than the cached sequences; tensor errors (shapes the model's layers refuse).
    pub fn lookup_into(&mut self, ids: &[u32], cache: &mut KvCache) -> Result<usize> {
        if cache.offset() != 0 {
            return Err(Error::InvalidArgument(format!(
                "prefix cache lookup: the cache already holds {} positions",
                cache.offset()
            )));
        }
        if !cache.sliceable() || ids.len() <= 1 {
            return Ok(0);
        }
        if let Some(n) = self.n_layers {
            if n != cache.n_layers() {
                return Err(Error::InvalidArgument(format!(
                    "prefix cache lookup: the cache has {} layers, the cached sequences {n}",
                    cache.n_layers()
                )));
            }
        }
        let b = self.config.block_size;
        let limit = (ids.len() - 1) / b * b;
        let (path, matched) = self.walk(&ids[..limit]);
        if matched == 0 {
            return Ok(0);
        }
        for i in 0..cache.n_layers() {
            let mut ks = Vec::with_capacity(path.len());
            let mut vs = Vec::with_capacity(path.len());
            for &(n, len) in &path {
                let (k, v) = &self.node(n).kv[i];
                ks.push(k.narrow(2, 0, len)?);
                vs.push(v.narrow(2, 0, len)?);
            }
            let (k, v) = if ks.len() == 1 {
                (ks.remove(0), vs.remove(0))
            } else {
                (Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?)
            };
            let layer: &mut dyn LayerKvCache = cache.layer_for_pass(i)?;
            layer.update(&k, &v)?;
        }
        Ok(matched)
    }

    /// [`Self::lookup_into`] a fresh cache of `model` ([`CausalLM::new_cache`]): the matched
    /// length and the cache holding it (empty when 0).
    ///
    /// Errors: as [`Self::lookup_into`].
    pub fn lookup(&mut self, ids: &[u32], model: &dyn CausalLM) -> Result<(usize, KvCache)> {
        let mut cache = model.new_cache();
        let n = self.lookup_into(ids, &mut cache)?;
        Ok((n, cache))
    }

    /// Adds the whole blocks of `ids`, whose keys and values `cache` holds (its first
    /// `ids.len()` positions), then evicts down to the budget. Returns the tokens newly
    /// stored. Nothing is stored for a cache that is not [`KvCache::sliceable`].
    ///
    /// Errors: [`Error::InvalidArgument`] when `cache` holds fewer than `ids.len()` positions
    /// or has another layer count than the cached sequences; tensor errors.
    pub fn insert(&mut self, ids: &[u32], cache: &KvCache) -> Result<usize> {
        if !cache.sliceable() {
            return Ok(0);
        }
        if cache.offset() < ids.len() {
            return Err(Error::InvalidArgument(format!(
                "prefix cache insert: {} token ids but the cache holds {} positions",
                ids.len(),
                cache.offset()
            )));
        }
        let n_layers = cache.n_layers();
        if *self.n_layers.get_or_insert(n_layers) != n_layers {
            return Err(Error::InvalidArgument(format!(
                "prefix cache insert: the cache has {n_layers} layers, the cached sequences {}",
                self.n_layers.unwrap_or(0)
            )));
        }
        let b = self.config.block_size;
        let n = ids.len() / b * b;
        let ids = &ids[..n];
        let (path, matched) = self.walk(ids);
        let mut parent = 0;
        if let Some(&(last, m)) = path.last() {
            parent = last;
            if m < self.node(last).tokens.len() {
                if matched == n {
                    return Ok(0); // all inside an existing run
                }
                parent = self.split(last, m)?;
            }
        }
        if matched == n {
            return Ok(0);
        }
        let mut kv = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let Some((k, v)) = cache.layer_state(i)? else {
                return Err(Error::InvalidArgument(format!(
                    "prefix cache insert: layer {i} of the cache is empty"
                )));
            };
            kv.push((
                k.narrow(2, matched, n - matched)?.copy()?,
                v.narrow(2, matched, n - matched)?.copy()?,
            ));
        }
        let now = self.tick();
        let node = self.add(Node::new(parent, ids[matched..].to_vec(), kv, now));
        self.node_mut(parent)
            .children
            .insert(ids[matched..matched + b].to_vec(), node);
        self.dirty = true;
        self.evict();
        Ok(n - matched)
    }

    /// Splits node `i` after its first `at` tokens (a multiple of the block size, less than
    /// its run): a new node takes them, between `i` and its parent. Returns the new node.
    fn split(&mut self, i: usize, at: usize) -> Result<usize> {
        let b = self.config.block_size;
        let old = self.nodes[i].take().expect("a live prefix-cache node");
        self.bytes -= old.bytes;
        let mut head_kv = Vec::with_capacity(old.kv.len());
        let mut tail_kv = Vec::with_capacity(old.kv.len());
        let rest = old.tokens.len() - at;
        for (k, v) in &old.kv {
            head_kv.push((k.narrow(2, 0, at)?.copy()?, v.narrow(2, 0, at)?.copy()?));
            tail_kv.push((
                k.narrow(2, at, rest)?.copy()?,
                v.narrow(2, at, rest)?.copy()?,
            ));
        }
        let mut head = Node::new(
            old.parent,
            old.tokens[..at].to_vec(),
            head_kv,
            old.last_used,
        );
        let mut tail = Node::new(i, old.tokens[at..].to_vec(), tail_kv, old.last_used);
        tail.children = old.children;
        head.children
            .insert(old.tokens[at..at + b].to_vec(), usize::MAX);
        // The tail keeps index `i` (its children point at it); the head gets a new one.
        self.bytes += tail.bytes;
        self.nodes[i] = Some(tail);
        let h = self.add(head);
        if let Some(slot) = self.node_mut(h).children.values_mut().next() {
            *slot = i;
        }
        self.node_mut(i).parent = h;
        let parent = old.parent;
        self.node_mut(parent)
            .children
            .insert(old.tokens[..b].to_vec(), h);
        self.dirty = true;
        Ok(h)
    }

    /// Evicts least recently used leaves until the budget holds.
    fn evict(&mut self) {
        while self.bytes > self.config.max_bytes {
            let victim = self
                .nodes
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
                .filter(|(_, n)| n.children.is_empty())
                .min_by_key(|(_, n)| n.last_used)
                .map(|(i, _)| i);
            let Some(i) = victim else { break };
            let node = self.nodes[i].take().expect("a live prefix-cache node");
            self.bytes -= node.bytes;
            self.free.push(i);
            let key = &node.tokens[..self.config.block_size];
            self.node_mut(node.parent).children.remove(key);
            self.dirty = true;
            tracing::debug!(
                tokens = node.tokens.len(),
                bytes = node.bytes,
                "prefix cache: evicted a node"
            );
        }
    }

    /// The tree as it is now, for [`PrefixSnapshot::write`] (on another thread: the tensors
    /// are shared, not copied); marks the tree clean.
    pub fn snapshot(&mut self) -> PrefixSnapshot {
        self.dirty = false;
        // Parents before children: breadth-first from the root.
        let mut order = Vec::new();
        let mut index = HashMap::new();
        let mut queue = std::collections::VecDeque::from([0usize]);
        while let Some(i) = queue.pop_front() {
            let n = self.node(i);
            let mut kids: Vec<usize> = n.children.values().copied().collect();
            kids.sort_unstable();
            queue.extend(kids);
            if i != 0 {
                index.insert(i, order.len());
                order.push(i);
            }
        }
        let nodes = order
            .iter()
            .map(|&i| {
                let n = self.node(i);
                SnapshotNode {
                    parent: if n.parent == 0 {
                        -1
                    } else {
                        index[&n.parent] as i64
                    },
                    tokens: n.tokens.clone(),
                    last_used: n.last_used,
                    kv: n.kv.clone(),
                }
            })
            .collect();
        PrefixSnapshot {
            block_size: self.config.block_size,
            n_layers: self.n_layers.unwrap_or(0),
            nodes,
        }
    }

    /// Writes the tree to `dir` ([`FILE_NAME`], see the module documentation), creating the
    /// directory; marks the tree clean.
    ///
    /// Errors: [`Error::Io`] naming the file when it cannot be written.
    pub fn save(&mut self, dir: &Path, identity: &ModelIdentity) -> Result<PathBuf> {
        self.snapshot().write(dir, identity)
    }

    /// A cache with `config`'s bounds holding what `dir`'s file holds for the model
    /// `identity` names, on `device`, evicted down to the budget. A missing file gives an
    /// empty cache ([`LoadOutcome::Missing`]); a file of another model, format or block size,
    /// or a damaged one, an empty cache and [`LoadOutcome::Refused`] with the reason (the
    /// file is left alone; it is overwritten at the next save).
    ///
    /// Errors: none today besides those of reading an existing file ([`Error::Io`]).
    pub fn load(
        dir: &Path,
        identity: &ModelIdentity,
        config: PrefixCacheConfig,
        device: &Device,
    ) -> Result<(Self, LoadOutcome)> {
        let path = dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Self::new(config), LoadOutcome::Missing))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        match Self::from_bytes(&bytes, &path, identity, config, device) {
            Ok(c) => {
                let outcome = LoadOutcome::Loaded {
                    nodes: c.n_nodes(),
                    tokens: c.n_tokens(),
                };
                Ok((c, outcome))
            }
            Err(reason) => Ok((Self::new(config), LoadOutcome::Refused(reason))),
        }
    }

    fn from_bytes(
        bytes: &[u8],
        path: &Path,
        identity: &ModelIdentity,
        config: PrefixCacheConfig,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        let file = path.display();
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("{file}: not a safetensors file ({e})"))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| -> std::result::Result<&str, String> {
            meta.get(k)
                .map(String::as_str)
                .ok_or_else(|| format!("{file}: not a pocketlm prefix cache (no `{k}` metadata)"))
        };
        if field("format")? != FORMAT {
            return Err(format!(
                "{file}: `format` is `{}`, not `{FORMAT}`",
                field("format")?
            ));
        }
        if field("format_version")? != FORMAT_VERSION {
            return Err(format!(
                "{file}: `format_version` is {}, this build reads {FORMAT_VERSION}",
                field("format_version")?
            ));
        }
        let theirs = [
            ("model.path", identity.path.clone()),
            ("model.size", identity.size.to_string()),
            ("model.architecture", identity.architecture.clone()),
        ];
        for (name, mine) in theirs {
            let v = field(name)?;
            if v != mine {
                return Err(format!(
                    "{file}: made by another model (`{name}` is `{v}`, the loaded model's is `{mine}`)"
                ));
            }
        }
        let num = |k: &str| -> std::result::Result<usize, String> {
            field(k)?
                .parse()
                .map_err(|_| format!("{file}: `{k}` is not a number"))
        };
        let block = num("block_size")?;
        if block != config.block_size.max(1) {
            return Err(format!(
                "{file}: `block_size` is {block}, this server uses {}",
                config.block_size.max(1)
            ));
        }
        let n_layers = num("n_layers")?;
        #[derive(serde::Deserialize)]
        struct Entry {
            parent: i64,
            tokens: Vec<u32>,
            last_used: u64,
        }
        let entries: Vec<Entry> = serde_json::from_str(field("nodes")?)
            .map_err(|e| format!("{file}: `nodes` is not a list of nodes ({e})"))?;
        let mut tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| format!("{file}: reading tensors: {e}"))?;
        let mut cache = Self::new(config);
        cache.n_layers = (!entries.is_empty()).then_some(n_layers);
        let mut index = Vec::with_capacity(entries.len());
        for (j, e) in entries.into_iter().enumerate() {
            if e.tokens.is_empty() || e.tokens.len() % block != 0 {
                return Err(format!(
                    "{file}: node {j} holds {} tokens, not a positive multiple of `block_size` {block}",
                    e.tokens.len()
                ));
            }
            let parent = match e.parent {
                -1 => 0,
                p if p >= 0 && (p as usize) < j => index[p as usize],
                p => {
                    return Err(format!(
                        "{file}: node {j} has parent {p}, not an earlier node"
                    ))
                }
            };
            let mut kv = Vec::with_capacity(n_layers);
            let mut shape: Option<Vec<usize>> = None;
            for i in 0..n_layers {
                let mut get = |kind: &str| -> std::result::Result<Tensor, String> {
                    let name = format!("nodes.{j}.layers.{i}.{kind}");
                    let t = tensors
                        .remove(&name)
                        .ok_or_else(|| format!("{file}: tensor `{name}` is missing"))?;
                    let d = t.dims().to_vec();
                    let want = shape.get_or_insert_with(|| d.clone());
                    if d.len() != 4 || d[0] != 1 || d[2] != e.tokens.len() || &d != want {
                        return Err(format!(
                            "{file}: tensor `{name}` has shape {d:?}, expected [1, kv_heads, {}, head_dim] as the node's other tensors",
                            e.tokens.len()
                        ));
                    }
                    Ok(t)
                };
                let k = get("keys")?;
                let v = get("values")?;
                kv.push((k, v));
            }
            let key = e.tokens[..block].to_vec();
            cache.clock = cache.clock.max(e.last_used);
            let node = cache.add(Node::new(parent, e.tokens, kv, e.last_used));
            if cache.node_mut(parent).children.insert(key, node).is_some() {
                return Err(format!(
                    "{file}: node {j} starts with the same block as a sibling"
                ));
            }
            index.push(node);
        }
        cache.evict();
        cache.dirty = false;
        Ok(cache)
    }
}

/// One node of a [`PrefixSnapshot`].
#[derive(Debug, Clone)]
struct SnapshotNode {
    parent: i64,
    tokens: Vec<u32>,
    last_used: u64,
    kv: Vec<(Tensor, Tensor)>,
}

/// The tree at one moment ([`PrefixCache::snapshot`]), to be written without holding the
/// cache.
#[derive(Debug, Clone)]
pub struct PrefixSnapshot {
    block_size: usize,
    n_layers: usize,
    nodes: Vec<SnapshotNode>,
}

impl PrefixSnapshot {
    /// Nodes in the snapshot.
    pub fn n_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Writes the snapshot to `dir/`[`FILE_NAME`] (through a temporary file renamed over it),
    /// creating `dir`; returns the file's path.
    ///
    /// Errors: [`Error::Io`] naming the file or directory that could not be written.
    pub fn write(&self, dir: &Path, identity: &ModelIdentity) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!("{FILE_NAME}.tmp{}", std::process::id()));
        let mut tensors = Vec::with_capacity(2 * self.n_layers * self.nodes.len());
        let mut entries = Vec::with_capacity(self.nodes.len());
        for (j, n) in self.nodes.iter().enumerate() {
            for (i, (k, v)) in n.kv.iter().enumerate() {
                tensors.push((format!("nodes.{j}.layers.{i}.keys"), k.contiguous()?));
                tensors.push((format!("nodes.{j}.layers.{i}.values"), v.contiguous()?));
            }
            entries.push(serde_json::json!({
                "parent": n.parent,
                "tokens": n.tokens,
                "last_used": n.last_used,
            }));
        }
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("model.path", identity.path.clone()),
            ("model.size", identity.size.to_string()),
            ("model.architecture", identity.architecture.clone()),
            ("block_size", self.block_size.to_string()),
            ("n_layers", self.n_layers.to_string()),
            ("nodes", serde_json::Value::Array(entries).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize_to_file(tensors, Some(meta), &tmp).map_err(|e| {
            Error::io(
                &tmp,
                std::io::Error::other(format!("writing the prefix cache: {e}")),
            )
        })?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }
}

/// The default directory of a model's prefix cache: `<pocketlm home>/prefix-cache/<file
/// stem>-<hash of the model's path and size>` (one per model file).
pub fn default_dir(identity: &ModelIdentity) -> PathBuf {
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in identity
        .path
        .bytes()
        .chain(identity.size.to_le_bytes())
        .chain(identity.architecture.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let stem = Path::new(&identity.path)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    crate::fetch::pocketlm_home()
        .join("prefix-cache")
        .join(format!("{stem}-{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvCacheConfig;

    const LAYERS: usize = 2;

    /// A growing cache of `LAYERS` layers (2 KV heads, head dim 3) whose key at position `p`
    /// is `ids[p]` plus the layer (values: its negation): what a model would compute if a
    /// position's keys depended only on its token.
    fn cache_of(ids: &[u32]) -> KvCache {
        let mut c = KvCache::growing(LAYERS);
        for l in 0..LAYERS {
            let vals: Vec<f32> = (0..2)
                .flat_map(|_| ids.iter().flat_map(move |&t| [t as f32 + l as f32; 3]))
                .collect();
            let k = Tensor::from_vec(vals, (1, 2, ids.len(), 3), &Device::Cpu).unwrap();
            let v = k.neg().unwrap();
            c.layer(l).unwrap().update(&k, &v).unwrap();
        }
        c
    }

    /// Checks that `c` holds what [`cache_of`] gives for `ids`.
    fn assert_holds(c: &KvCache, ids: &[u32]) {
        assert_eq!(c.offset(), ids.len());
        if ids.is_empty() {
            return;
        }
        let want = cache_of(ids);
        for l in 0..LAYERS {
            let (k, v) = c.layer_state(l).unwrap().unwrap();
            let (wk, wv) = want.layer_state(l).unwrap().unwrap();
            let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(k), flat(wk), "layer {l} keys");
            assert_eq!(flat(v), flat(wv), "layer {l} values");
        }
    }

    fn seq(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    fn config(max_bytes: usize) -> PrefixCacheConfig {
        PrefixCacheConfig {
            block_size: 4,
            max_bytes,
        }
    }

    /// Looks `ids` up into a fresh cache; returns the matched length and checks the contents.
    fn hit(p: &mut PrefixCache, ids: &[u32]) -> usize {
        let mut c = KvCache::growing(LAYERS);
        let n = p.lookup_into(ids, &mut c).unwrap();
        assert_holds(&c, &ids[..n]);
        n
    }

    #[test]
    fn matches_whole_blocks_and_leaves_a_token_to_prefill() {
        let mut p = PrefixCache::new(config(1 << 20));
        let a = seq(0, 18); // 4 whole blocks + 2 tokens
        assert_eq!(hit(&mut p, &a), 0);
        assert_eq!(p.insert(&a, &cache_of(&a)).unwrap(), 16);
        assert_eq!((p.n_nodes(), p.n_tokens()), (1, 16));
        // The same prompt again: its 16 cached tokens (17 and 18 are no whole block).
        assert_eq!(hit(&mut p, &a), 16);
        // A prompt of exactly the cached 16 tokens: at most 15 may come from the cache, in
        // whole blocks: 12.
        assert_eq!(hit(&mut p, &a[..16]), 12);
        // A longer prompt sharing 10 tokens: 2 whole blocks.
        let mut b = a[..10].to_vec();
        b.extend(seq(100, 20));
        assert_eq!(hit(&mut p, &b), 8);
        // No shared first block: nothing.
        assert_eq!(hit(&mut p, &seq(1, 30)), 0);
        // Inserting what is already there adds nothing.
        assert_eq!(p.insert(&a[..12], &cache_of(&a[..12])).unwrap(), 0);
        assert_eq!(p.n_nodes(), 1);
        // A cache holding fewer positions than the ids is refused.
        assert!(p.insert(&a, &cache_of(&a[..8])).is_err());
        // So is a non-empty cache to look up into.
        let mut c = cache_of(&a[..4]);
        assert!(p.lookup_into(&a, &mut c).is_err());
    }

    #[test]
    fn a_diverging_sequence_splits_a_node() {
        let mut p = PrefixCache::new(config(1 << 20));
        let a = seq(0, 24);
        p.insert(&a, &cache_of(&a)).unwrap();
        // Shares 2 blocks (and 2 tokens of the third) with `a`.
        let mut b = a[..10].to_vec();
        b.extend(seq(500, 14)); // 24 tokens
        assert_eq!(p.insert(&b, &cache_of(&b)).unwrap(), 16);
        // Root -> [0..8) -> {a's [8..24), b's [8..24)}.
        assert_eq!((p.n_nodes(), p.n_tokens()), (3, 8 + 16 + 16));
        let mut a2 = a.clone();
        a2.push(7);
        let mut b2 = b.clone();
        b2.push(7);
        assert_eq!(hit(&mut p, &a2), 24);
        assert_eq!(hit(&mut p, &b2), 24);
        // A third branch off the middle of the shared node: split again.
        let mut c = a[..4].to_vec();
        c.extend(seq(900, 8));
        assert_eq!(p.insert(&c, &cache_of(&c)).unwrap(), 8);
        assert_eq!(p.n_nodes(), 5);
        let mut c2 = c.clone();
        c2.push(1);
        assert_eq!(hit(&mut p, &c2), 12);
        assert_eq!(hit(&mut p, &a2), 24);
        assert_eq!(hit(&mut p, &b2), 24);
        // Bytes: 2 layers x (keys + values) x 2 heads x 3 dims x f32 per token.
        assert_eq!(p.nbytes(), p.n_tokens() * LAYERS * 2 * 2 * 3 * 4);
    }

    #[test]
    fn evicts_least_recently_used_leaves_under_the_budget() {
        let per_token = LAYERS * 2 * 2 * 3 * 4;
        // Room for 40 tokens.
        let mut p = PrefixCache::new(config(40 * per_token));
        let root = seq(0, 8);
        let branch = |start: u32| {
            let mut v = root.clone();
            v.extend(seq(start, 8));
            v
        };
        let (a, b, c) = (branch(100), branch(200), branch(300));
        p.insert(&a, &cache_of(&a)).unwrap(); // 16 tokens
        p.insert(&b, &cache_of(&b)).unwrap(); // +8 (split)
        assert_eq!(p.n_tokens(), 24);
        // Use `a` again: `b` is now the least recently used leaf.
        let mut a2 = a.clone();
        a2.push(0);
        assert_eq!(hit(&mut p, &a2), 16);
        p.insert(&c, &cache_of(&c)).unwrap(); // 32 tokens: fits
        let d = branch(400);
        p.insert(&d, &cache_of(&d)).unwrap(); // 40: fits exactly
        assert_eq!(p.n_tokens(), 40);
        let e = branch(500);
        p.insert(&e, &cache_of(&e)).unwrap(); // 48 > 40: evict `b`
        assert_eq!(p.n_tokens(), 40);
        assert!(p.nbytes() <= 40 * per_token);
        let mut b2 = b.clone();
        b2.push(0);
        assert_eq!(
            hit(&mut p, &b2),
            8,
            "b's own block was evicted, the shared root kept"
        );
        assert_eq!(hit(&mut p, &a2), 16, "a was used recently and stays");
        // A sequence larger than the whole budget does not stay.
        let big = seq(10_000, 48);
        p.insert(&big, &cache_of(&big)).unwrap();
        assert!(p.nbytes() <= 40 * per_token);
    }

    #[test]
    fn caches_that_cannot_be_sliced_are_not_cached() {
        let mut p = PrefixCache::new(config(1 << 20));
        let a = seq(0, 16);
        for kind in [
            KvCacheConfig {
                max_kv_size: Some(64),
                ..Default::default()
            },
            KvCacheConfig {
                kv_bits: Some(8),
                kv_group_size: 32,
                ..Default::default()
            },
        ] {
            let mut c = KvCache::new(LAYERS, 64, &kind).unwrap();
            for l in 0..LAYERS {
                let k =
                    Tensor::zeros((1, 1, 16, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
                c.layer(l).unwrap().update(&k, &k).unwrap();
            }
            assert!(!c.sliceable());
            assert_eq!(p.insert(&a, &c).unwrap(), 0);
            assert_eq!(p.n_nodes(), 0);
        }
        p.insert(&a, &cache_of(&a)).unwrap();
        let mut q = KvCache::new(
            LAYERS,
            64,
            &KvCacheConfig {
                kv_bits: Some(8),
                kv_group_size: 32,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.lookup_into(&seq(0, 20), &mut q).unwrap(), 0);
        assert_eq!(q.offset(), 0);
    }

    fn identity(path: &str) -> ModelIdentity {
        ModelIdentity {
            path: path.into(),
            size: 1234,
            architecture: "llama".into(),
        }
    }

    #[test]
    fn persists_and_refuses_another_models_file() {
        let dir = tempfile::tempdir().unwrap();
        let me = identity("/models/a.gguf");
        let mut p = PrefixCache::new(config(1 << 20));
        let a = seq(0, 24);
        let mut b = a[..8].to_vec();
        b.extend(seq(50, 12));
        p.insert(&a, &cache_of(&a)).unwrap();
        p.insert(&b, &cache_of(&b)).unwrap();
        assert!(p.is_dirty());
        let path = p.save(dir.path(), &me).unwrap();
        assert!(!p.is_dirty());
        assert_eq!(path, dir.path().join(FILE_NAME));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let (mut q, outcome) =
            PrefixCache::load(dir.path(), &me, config(1 << 20), &Device::Cpu).unwrap();
        assert_eq!(
            outcome,
            LoadOutcome::Loaded {
                nodes: 3,
                tokens: 8 + 16 + 12
            }
        );
        assert_eq!((q.n_nodes(), q.nbytes()), (p.n_nodes(), p.nbytes()));
        let (mut a2, mut b2) = (a.clone(), b.clone());
        a2.push(0);
        b2.push(0);
        assert_eq!(hit(&mut q, &a2), 24);
        assert_eq!(hit(&mut q, &b2), 20);
        // The loaded tree takes inserts as the saved one did.
        let mut c = a[..12].to_vec();
        c.extend(seq(70, 4));
        assert_eq!(q.insert(&c, &cache_of(&c)).unwrap(), 4);

        // Another model (path, size or architecture): refused, the cache starts empty.
        for other in [
            identity("/models/b.gguf"),
            ModelIdentity {
                size: 1,
                ..me.clone()
            },
            ModelIdentity {
                architecture: "qwen2".into(),
                ..me.clone()
            },
        ] {
            let (q, outcome) =
                PrefixCache::load(dir.path(), &other, config(1 << 20), &Device::Cpu).unwrap();
            match outcome {
                LoadOutcome::Refused(why) => {
                    assert!(why.contains("another model"), "{why}");
                    assert!(why.contains(FILE_NAME), "{why}");
                }
                o => panic!("{o:?}"),
            }
            assert_eq!(q.n_nodes(), 0);
        }
        // Another block size: refused.
        let (_, outcome) = PrefixCache::load(
            dir.path(),
            &me,
            PrefixCacheConfig {
                block_size: 8,
                max_bytes: 1 << 20,
            },
            &Device::Cpu,
        )
        .unwrap();
        assert!(matches!(outcome, LoadOutcome::Refused(ref w) if w.contains("block_size")));
        // A smaller budget: loaded, then evicted down to it.
        let per_token = LAYERS * 2 * 2 * 3 * 4;
        let (q, _) =
            PrefixCache::load(dir.path(), &me, config(30 * per_token), &Device::Cpu).unwrap();
        assert!(
            q.nbytes() <= 30 * per_token && q.n_nodes() == 2,
            "{}",
            q.n_nodes()
        );
        // No file: empty. A damaged file: refused, not an error.
        let empty = tempfile::tempdir().unwrap();
        let (_, outcome) =
            PrefixCache::load(empty.path(), &me, config(1 << 20), &Device::Cpu).unwrap();
        assert_eq!(outcome, LoadOutcome::Missing);
        std::fs::write(empty.path().join(FILE_NAME), b"not safetensors").unwrap();
        let (_, outcome) =
            PrefixCache::load(empty.path(), &me, config(1 << 20), &Device::Cpu).unwrap();
        assert!(matches!(outcome, LoadOutcome::Refused(ref w) if w.contains("not a safetensors")));
    }
}
