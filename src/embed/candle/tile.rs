//! What the bf16 and int8 matrix kernels share: the tile width in 32-bit lanes, the masks of
//! a partial output panel, and the message naming CPU features a kernel lacks.

/// 32-bit lanes of a 512-bit vector.
pub(super) const LANES: usize = 16;

/// Masks of the three 16-lane vectors of a 48-column output panel of which only `columns`
/// exist (all ones for a full panel).
pub(super) fn lane_masks(columns: usize) -> [u16; 3] {
    std::array::from_fn(|v| {
        let lanes = columns.saturating_sub(v * LANES).min(LANES);
        // At most 16 ones, so the cast is exact.
        ((1u32 << lanes) - 1) as u16
    })
}

/// The names of the `(feature, detected)` pairs not detected, joined by ", "; `None` if all
/// are present.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn missing(features: &[(&str, bool)]) -> Option<String> {
    let missing: Vec<&str> = features
        .iter()
        .filter_map(|&(name, present)| (!present).then_some(name))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_exactly_the_columns() {
        assert_eq!(lane_masks(48), [0xffff; 3]);
        assert_eq!(lane_masks(20), [0xffff, 0x000f, 0]);
        assert_eq!(lane_masks(1), [1, 0, 0]);
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(&[("a", true), ("b", true)]), None);
        assert_eq!(
            missing(&[("a", false), ("b", true), ("c", false)]).as_deref(),
            Some("a, c")
        );
    }
}
