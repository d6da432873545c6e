//! A prefix cache across requests (SGLang's RadixAttention, vLLM's automatic prefix caching):
//! the keys and values of token sequences already computed, kept in a radix tree of fixed-size
//! token blocks, so that a new prompt starting with a cached prefix (a shared system prompt,
//! the previous turns of a chat) prefills only the rest.
//!
//! - The tree's edges are runs of whole blocks of [`PrefixCacheConfig::block_size`] tokens;
//!   each node holds, for every layer, the keys and values of its run
//!   (`[1, kv_heads, run, head_dim]`, the dtype the cache's [`LayerKvCache::state`] gives:
//!   f32 on CPU). A node is split at a block boundary when a new sequence diverges inside it.
//! - Sequences whose caches are paged in one [`KvBlockPool`] (a batch under a KV budget,
//!   [`crate::generate::batch`]) with blocks of [`BLOCK`] tokens: a node holds the run's pool
//!   blocks by reference instead of a copy (vLLM's automatic prefix caching), and a lookup
//!   into a paged cache of that pool puts those block ids in its block table (appends then go
//!   to fresh blocks; a shared block is copied before it is written). They count against the
//!   pool until evicted: [`PrefixCache::reclaim_pool_blocks`] gives them back when sequences
//!   need the room. Lookups into other caches copy them out.
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
//! Persistence ([`PrefixCache::save`], [`PrefixCache::load`]; pool blocks are gathered into
//! tensors when written, and a loaded tree holds tensors): one safetensors file,
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
use crate::kv_pool::{KvBlockPool, PoolBlocks, BLOCK};
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
    /// The run's keys and values.
    kv: NodeKv,
    /// Children by the token ids of their first block.
    children: HashMap<Vec<u32>, usize>,
    last_used: u64,
    bytes: usize,
}

/// A node's keys and values.
#[derive(Debug, Clone)]
enum NodeKv {
    /// Per layer: keys and values `[1, kv_heads, run, head_dim]` of its own.
    Tensors(Vec<(Tensor, Tensor)>),
    /// The run's blocks in the KV block pool of the sequences that computed it, held by
    /// reference and given to new sequences' block tables as they are (block size
    /// [`BLOCK`]; vLLM's automatic prefix caching).
    Blocks(PoolBlocks),
}

impl NodeKv {
    fn nbytes(&self) -> usize {
        match self {
            NodeKv::Tensors(kv) => kv
                .iter()
                .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
                .sum(),
            NodeKv::Blocks(b) => b.nbytes(),
        }
    }

    /// Layer `i`'s first `len` positions as tensors (`[1, kv_heads, len, head_dim]`; blocks
    /// are gathered, `len` a multiple of [`BLOCK`]).
    fn layer(&self, i: usize, len: usize) -> Result<(Tensor, Tensor)> {
        match self {
            NodeKv::Tensors(kv) => {
                let (k, v) = kv.get(i).ok_or_else(|| {
                    Error::InvalidArgument(format!("prefix cache: no layer {i} in a node"))
                })?;
                Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
            }
            NodeKv::Blocks(b) => b.gather(i, len / BLOCK),
        }
    }
}

impl Node {
    fn new(parent: usize, tokens: Vec<u32>, kv: NodeKv, clock: u64) -> Self {
        let bytes = kv.nbytes();
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

/// Appends `parts` (keys and values `[1, kv_heads, run, head_dim]`, in order) to `layer` in
/// one update and empties the list.
fn append_parts(layer: &mut dyn LayerKvCache, parts: &mut Vec<(Tensor, Tensor)>) -> Result<()> {
    if parts.is_empty() {
        return Ok(());
    }
    let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = std::mem::take(parts).into_iter().unzip();
    let (k, v) = if ks.len() == 1 {
        (ks[0].clone(), vs[0].clone())
    } else {
        (Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?)
    };
    layer.update(&k, &v)?;
    Ok(())
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
            nodes: vec![Some(Node::new(
                0,
                Vec::new(),
                NodeKv::Tensors(Vec::new()),
                0,
            ))],
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
        let b = self.config.block_size;
        self.lookup_upto(ids, ids.len().saturating_sub(1) / b * b, cache)
    }

    /// As [`Self::lookup_into`] for ids that more tokens will follow (a sequence resumed from
    /// the ids its cache held): every whole cached block of `ids` may match, the last one
    /// included.
    ///
    /// Errors: as [`Self::lookup_into`].
    pub fn resume_into(&mut self, ids: &[u32], cache: &mut KvCache) -> Result<usize> {
        let b = self.config.block_size;
        self.lookup_upto(ids, ids.len() / b * b, cache)
    }

    /// [`Self::lookup_into`] matching at most `ids[..limit]` (`limit` a multiple of the block
    /// size).
    fn lookup_upto(&mut self, ids: &[u32], limit: usize, cache: &mut KvCache) -> Result<usize> {
        if cache.offset() != 0 {
            return Err(Error::InvalidArgument(format!(
                "prefix cache lookup: the cache already holds {} positions",
                cache.offset()
            )));
        }
        if !cache.sliceable() || limit == 0 {
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
        let (path, matched) = self.walk(&ids[..limit]);
        if matched == 0 {
            return Ok(0);
        }
        for i in 0..cache.n_layers() {
            let layer: &mut dyn LayerKvCache = cache.layer_for_pass(i)?;
            // Runs to copy in, in order; a node of pool blocks goes into a paged cache of the
            // same pool by reference.
            let mut parts = Vec::with_capacity(path.len());
            for &(n, len) in &path {
                match &self.node(n).kv {
                    NodeKv::Blocks(b) if len % BLOCK == 0 => {
                        append_parts(layer, &mut parts)?;
                        if !layer.share_blocks(b.pool(), i, &b.ids(i)[..len / BLOCK])? {
                            parts.push(b.gather(i, len / BLOCK)?);
                        }
                    }
                    kv => parts.push(kv.layer(i, len)?),
                }
            }
            append_parts(layer, &mut parts)?;
        }
        Ok(matched)
    }

    /// The blocks of positions `from..to` (multiples of [`BLOCK`]) of `cache` when every layer
    /// is a paged cache of one pool (layer `i` in pool layer `i`) and this tree's blocks are
    /// the pool's; `None` otherwise.
    fn pool_blocks(&self, cache: &KvCache, from: usize, to: usize) -> Option<Result<PoolBlocks>> {
        if self.config.block_size != BLOCK || cache.n_layers() == 0 {
            return None;
        }
        let mut pool: Option<std::sync::Arc<KvBlockPool>> = None;
        let mut ids = Vec::with_capacity(cache.n_layers());
        for i in 0..cache.n_layers() {
            let view = cache.layer_ref(i)?.paged()?;
            let same = pool
                .as_ref()
                .is_none_or(|p| std::sync::Arc::ptr_eq(p, view.pool()));
            if !same || view.layer() != i || view.table().len() < to / BLOCK {
                return None;
            }
            pool.get_or_insert_with(|| view.pool().clone());
            ids.push(view.table()[from / BLOCK..to / BLOCK].to_vec());
        }
        Some(PoolBlocks::share(&pool?, ids))
    }

    /// Evicts least recently used leaves holding blocks of `pool` until it has `free` free
    /// blocks ([`KvBlockPool::free_blocks`]) or no such leaf is left (blocks that running
    /// sequences share stay in use). Returns the nodes evicted.
    pub fn reclaim_pool_blocks(
        &mut self,
        pool: &std::sync::Arc<KvBlockPool>,
        free: usize,
    ) -> usize {
        let mut evicted = 0;
        while pool.free_blocks() < free
            && self.evict_lru_leaf(
                |kv| matches!(kv, NodeKv::Blocks(b) if std::sync::Arc::ptr_eq(b.pool(), pool)),
            )
        {
            evicted += 1;
        }
        evicted
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
        let kv = match self.pool_blocks(cache, matched, n) {
            Some(blocks) => NodeKv::Blocks(blocks?),
            None => {
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
                NodeKv::Tensors(kv)
            }
        };
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
        let rest = old.tokens.len() - at;
        let (head_kv, tail_kv) = match old.kv {
            NodeKv::Tensors(kv) => {
                let mut head_kv = Vec::with_capacity(kv.len());
                let mut tail_kv = Vec::with_capacity(kv.len());
                for (k, v) in &kv {
                    head_kv.push((k.narrow(2, 0, at)?.copy()?, v.narrow(2, 0, at)?.copy()?));
                    tail_kv.push((
                        k.narrow(2, at, rest)?.copy()?,
                        v.narrow(2, at, rest)?.copy()?,
                    ));
                }
                (NodeKv::Tensors(head_kv), NodeKv::Tensors(tail_kv))
            }
            // `at` is a multiple of the block size, which is `BLOCK` for pool blocks.
            NodeKv::Blocks(mut head) => {
                let tail = head.split_off(at / BLOCK);
                (NodeKv::Blocks(head), NodeKv::Blocks(tail))
            }
        };
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
        while self.bytes > self.config.max_bytes && self.evict_lru_leaf(|_| true) {}
    }

    /// Evicts the least recently used leaf whose keys and values `which` accepts (pool blocks
    /// go back to the pool unless sequences share them); returns whether there was one.
    fn evict_lru_leaf(&mut self, which: impl Fn(&NodeKv) -> bool) -> bool {
        let victim = self
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
            .filter(|(_, n)| n.children.is_empty() && which(&n.kv))
            .min_by_key(|(_, n)| n.last_used)
            .map(|(i, _)| i);
        let Some(i) = victim else { return false };
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
        true
    }

    /// The tree as it is now, for [`PrefixSnapshot::write`] (on another thread: the tensors
    /// are shared, not copied; nodes of pool blocks are gathered into tensors, so that the
    /// snapshot holds no block of the pool); marks the tree clean.
    ///
    /// Errors: tensor errors gathering pool blocks (the tree stays dirty).
    pub fn snapshot(&mut self) -> Result<PrefixSnapshot> {
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
        let n_layers = self.n_layers.unwrap_or(0);
        let nodes = order
            .iter()
            .map(|&i| {
                let n = self.node(i);
                // Pool blocks are copied out now, so that the write pins none of them.
                let kv = match &n.kv {
                    NodeKv::Tensors(kv) => kv.clone(),
                    kv => (0..n_layers)
                        .map(|l| kv.layer(l, n.tokens.len()))
                        .collect::<Result<_>>()?,
                };
                Ok(SnapshotNode {
                    parent: if n.parent == 0 {
                        -1
                    } else {
                        index[&n.parent] as i64
                    },
                    tokens: n.tokens.clone(),
                    last_used: n.last_used,
                    kv,
                })
            })
            .collect::<Result<_>>()?;
        self.dirty = false;
        Ok(PrefixSnapshot {
            block_size: self.config.block_size,
            n_layers,
            nodes,
        })
    }

    /// Writes the tree to `dir` ([`FILE_NAME`], see the module documentation), creating the
    /// directory; marks the tree clean.
    ///
    /// Errors: [`Error::Io`] naming the file when it cannot be written.
    pub fn save(&mut self, dir: &Path, identity: &ModelIdentity) -> Result<PathBuf> {
        self.snapshot()?.write(dir, identity)
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
            let node = cache.add(Node::new(
                parent,
                e.tokens,
                NodeKv::Tensors(kv),
                e.last_used,
            ));
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
    /// Per layer: keys and values `[1, kv_heads, tokens.len(), head_dim]` (a node's pool
    /// blocks gathered).
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

    /// An empty cache of [`LAYERS`] paged layers in `pool`.
    fn empty_paged(pool: &std::sync::Arc<KvBlockPool>) -> KvCache {
        KvCache::from_layers(
            (0..LAYERS)
                .map(|l| {
                    Box::new(crate::kv_pool::PagedKvCache::new(pool.clone(), l).unwrap())
                        as Box<dyn LayerKvCache>
                })
                .collect(),
        )
    }

    /// Appends positions `from..ids.len()` of what [`cache_of`] gives for `ids` to `c`.
    fn append_of(c: &mut KvCache, ids: &[u32], from: usize) {
        let src = cache_of(ids);
        for l in 0..LAYERS {
            let (k, v) = src.layer_state(l).unwrap().unwrap();
            let n = ids.len() - from;
            let (k, v) = (k.narrow(2, from, n).unwrap(), v.narrow(2, from, n).unwrap());
            c.layer(l).unwrap().update(&k, &v).unwrap();
        }
    }

    /// With blocks of [`BLOCK`] tokens and caches paged in one pool, the tree holds the
    /// pool's blocks by reference: two sequences starting with a cached 64-token prefix get its
    /// blocks in their tables and take fewer blocks than twice one sequence; a split splits
    /// the blocks, lookups into growing caches copy them, saving gathers them, and reclaiming
    /// gives them back once no sequence shares them.
    #[test]
    fn pool_blocks_are_shared_by_reference() {
        use std::sync::Arc;
        let pool = Arc::new(KvBlockPool::new(&[(2, 3); LAYERS], 64).unwrap());
        let mut p = PrefixCache::new(PrefixCacheConfig {
            block_size: BLOCK,
            max_bytes: 1 << 20,
        });
        let with = |tail: u32, n: usize| {
            let mut v = seq(0, 64);
            v.extend(seq(tail, n));
            v
        };
        let a = with(1000, 10);
        let mut ca = empty_paged(&pool);
        append_of(&mut ca, &a, 0);
        let one = pool.used_blocks();
        assert_eq!(one, 5);
        assert_eq!(p.insert(&a, &ca).unwrap(), 64);
        assert_eq!(p.nbytes(), 4 * pool.block_bytes());
        drop(ca);
        assert_eq!(
            pool.used_blocks(),
            4,
            "the tree keeps the prefix's 4 blocks"
        );

        let (b, c) = (with(2000, 10), with(3000, 10));
        let mut cb = empty_paged(&pool);
        let mut cc = empty_paged(&pool);
        assert_eq!(p.lookup_into(&b, &mut cb).unwrap(), 64);
        assert_eq!(p.lookup_into(&c, &mut cc).unwrap(), 64);
        assert_eq!(pool.used_blocks(), 4, "looked up by reference, not copied");
        append_of(&mut cb, &b, 64);
        append_of(&mut cc, &c, 64);
        assert_holds(&cb, &b);
        assert_holds(&cc, &c);
        let two = pool.used_blocks();
        assert_eq!(two, 4 + 1 + 1);
        assert!(
            two < 2 * one,
            "{two} blocks for two sequences, {one} for one"
        );
        for l in 0..LAYERS {
            let tb = cb.layer_ref(l).unwrap().paged().unwrap().table().to_vec();
            let tc = cc.layer_ref(l).unwrap().paged().unwrap().table().to_vec();
            assert_eq!(tb[..4], tc[..4]);
            assert_ne!(tb[4], tc[4]);
            assert!(tb[..4].iter().all(|&id| pool.refs(l, id) == Some(3)));
        }
        // Into a growing cache the blocks are copied.
        assert_eq!(hit(&mut p, &b), 64);

        // Diverging after 32 tokens splits the node and its blocks.
        let mut d = seq(0, 32);
        d.extend(seq(4000, 40));
        let mut cd = empty_paged(&pool);
        append_of(&mut cd, &d, 0);
        assert_eq!(p.insert(&d, &cd).unwrap(), 32);
        drop(cd);
        assert_eq!(p.n_nodes(), 3);
        assert_eq!(pool.used_blocks(), 6 + 2);
        assert_eq!(hit(&mut p, &b), 64);
        assert_eq!(hit(&mut p, &d), 64);
        let mut ce = empty_paged(&pool);
        assert_eq!(p.lookup_into(&d, &mut ce).unwrap(), 64);
        assert_holds(&ce, &d[..64]);
        drop(ce);

        // Saved (blocks gathered) and loaded (as tensors).
        let dir = tempfile::tempdir().unwrap();
        let me = identity("/models/a.gguf");
        p.save(dir.path(), &me).unwrap();
        let (mut q, _) = PrefixCache::load(dir.path(), &me, p.config(), &Device::Cpu).unwrap();
        assert_eq!((q.n_nodes(), q.nbytes()), (3, p.nbytes()));
        assert_eq!(hit(&mut q, &b), 64);
        assert_eq!(hit(&mut q, &d), 64);

        // Reclaiming: the blocks B and C share stay in use until they are dropped.
        assert_eq!(p.reclaim_pool_blocks(&pool, 64), 3);
        assert_eq!(pool.used_blocks(), 6);
        drop((cb, cc));
        assert_eq!(pool.used_blocks(), 0);
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
