//! Switches for A/B measurements of fast paths, read from the environment: each path is on
//! unless its variable is `0` (`POCKETLM_FLASH_ATTN=0 pocketlm bench ...` measures the path
//! it replaced, in the same binary). The switches, where they are read:
//! `POCKETLM_FUSED_DECODE`, `POCKETLM_KV_F16`, `POCKETLM_FUSED_BATCH`, `POCKETLM_SPLIT_MIXED`,
//! `POCKETLM_FUSED_ROWS` ([`crate::accel`]), `POCKETLM_CUDA_GRAPH`,
//! `POCKETLM_CUDA_POOL_KEEP`, `POCKETLM_FLASH_ATTN`, `POCKETLM_FLASH_PIPE`, `POCKETLM_PDL`
//! (`crate::cuda`, with the `cuda` feature), `POCKETLM_DEVICE_MASK` (`crate::sampling`: a
//! grammar's mask applied by the GPU sampler).

/// Whether environment variable `name` turns its path off: set to exactly `0`.
pub(crate) fn switched_off(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_zero_turns_a_path_off() {
        // Names of this test only, so that no other test reads them.
        std::env::set_var("POCKETLM_TEST_SWITCH_A", "0");
        std::env::set_var("POCKETLM_TEST_SWITCH_B", "1");
        assert!(super::switched_off("POCKETLM_TEST_SWITCH_A"));
        assert!(!super::switched_off("POCKETLM_TEST_SWITCH_B"));
        assert!(!super::switched_off("POCKETLM_TEST_SWITCH_UNSET"));
    }
}
