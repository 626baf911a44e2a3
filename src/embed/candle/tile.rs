//! What the bf16 and int8 matrix kernels share: the tile width in 32-bit lanes, the masks of
//! a partial output panel and the loads and stores through them ([`load_lanes`],
//! [`store_lanes`]), the message naming CPU features a kernel lacks, what an output starts
//! from ([`Start`]), and the parallel frame of a product ([`par_blocks`]).

use rayon::prelude::*;

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

/// Loads the lanes of `p` set in `mask` (zeros elsewhere): a plain load when all 16 are set.
///
/// A masked load or store costs more than a plain one on some CPUs (AMD microcodes the AVX2
/// forms; on Intel a masked load cannot take its data from a pending store), and a full
/// panel's vectors, nearly all of them, need no mask.
///
/// # Safety
///
/// The CPU must have AVX-512F; every lane set in `mask` must be inside one allocation
/// (lanes outside it are not touched).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn load_lanes(p: *const f32, mask: u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_maskz_loadu_ps};
    // SAFETY: the lanes read are those set in `mask` (all 16 on the first arm), inside an
    // allocation (this function's contract).
    unsafe {
        if mask == u16::MAX {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }
}

/// Stores the lanes of `v` set in `mask` to `p`: a plain store when all 16 are set (see
/// [`load_lanes`]).
///
/// # Safety
///
/// As [`load_lanes`], for writing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store_lanes(p: *mut f32, mask: u16, v: std::arch::x86_64::__m512) {
    use std::arch::x86_64::{_mm512_mask_storeu_ps, _mm512_storeu_ps};
    // SAFETY: the lanes written are those set in `mask` (all 16 on the first arm), inside an
    // allocation (this function's contract).
    unsafe {
        if mask == u16::MAX {
            _mm512_storeu_ps(p, v);
        } else {
            _mm512_mask_storeu_ps(p, mask, v);
        }
    }
}

/// A row-wise operation on whole output rows, in place (GELU, a layer norm).
pub(crate) type RowsFn<'a> = &'a (dyn Fn(&mut [f32]) + Sync);

/// What a linear layer's output starts from before the product is added: its bias, plus the
/// residual rows if any. A kernel writes it into each block of output rows right before it
/// adds that block's product, while the rows are in cache — not in a separate pass over the
/// whole output (at 32 × 256 tokens, the FFN's output is 50 MB).
#[derive(Clone, Copy)]
pub(crate) struct Start<'a> {
    /// One value per output column.
    pub bias: &'a [f32],
    /// `rows × bias.len()`, the whole layer's, or `None`.
    pub residual: Option<&'a [f32]>,
    /// What is applied to each block of whole output rows once its product is added (GELU
    /// after the FFN's first layer, layer norm after the residual layers), again while the
    /// rows are in cache. It must act on each row alone.
    pub then: Option<RowsFn<'a>>,
}

impl Start<'_> {
    /// `out = bias (+ residual)` for the whole rows of `out`, which are the layer's rows
    /// `first..`.
    ///
    /// # Panics
    ///
    /// If the residual does not reach those rows (a bug of the caller).
    pub(super) fn write(&self, out: &mut [f32], first: usize) {
        let n = self.bias.len().max(1);
        for (r, row) in out.chunks_exact_mut(n).enumerate() {
            match self.residual {
                Some(residual) => {
                    let at = (first + r) * n;
                    for ((o, x), b) in row.iter_mut().zip(&residual[at..at + n]).zip(self.bias) {
                        *o = x + b;
                    }
                }
                None => row.copy_from_slice(self.bias),
            }
        }
    }
}

/// Layout of a packed weight: `words` 32-bit groups of inputs per row (2 bf16 or 4 int8
/// inputs each), `panels` panels of `width` outputs. AVX-512 kernels read 48-output panels;
/// AMX ones 16-output panels (one B tile wide, so that a tile's rows are contiguous), in an
/// even count (the kernel takes two at a time), with whole 64-byte steps of inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Packing {
    pub words: usize,
    pub width: usize,
    pub panels: usize,
}

impl Packing {
    /// The layout of `outputs × inputs` weights with `per_word` inputs per 32-bit group, for
    /// AMX if `amx`.
    pub(super) fn new(outputs: usize, inputs: usize, per_word: usize, amx: bool) -> Self {
        let words = inputs.div_ceil(per_word.max(1));
        if amx {
            let width = 16;
            Self {
                words: words.next_multiple_of(16),
                width,
                panels: outputs.div_ceil(width).next_multiple_of(2),
            }
        } else {
            Self {
                words,
                width: 3 * LANES,
                panels: outputs.div_ceil(3 * LANES),
            }
        }
    }

    /// Lays out an `outputs × inputs` weight, `per_word` inputs per word, in this packing:
    /// `panels × words × width × per_word` values, where the value of output `o` and input
    /// `i` sits in panel `o / width`, word `i / per_word`, column `o % width`, place
    /// `i % per_word`, and `T::default()` fills what lies past the last output or input.
    /// `value(o, i)` gives the value of output `o` and input `i`.
    pub(super) fn pack<T: Copy + Default>(
        &self,
        per_word: usize,
        outputs: usize,
        inputs: usize,
        value: impl Fn(usize, usize) -> T,
    ) -> Vec<T> {
        let panel_len = self.words * self.width * per_word;
        let mut data = vec![T::default(); self.panels * panel_len];
        if panel_len == 0 {
            return data;
        }
        for (panel, packed) in data.chunks_exact_mut(panel_len).enumerate() {
            for (word, packed) in packed.chunks_exact_mut(self.width * per_word).enumerate() {
                for (column, packed) in packed.chunks_exact_mut(per_word).enumerate() {
                    let output = panel * self.width + column;
                    if output >= outputs {
                        break;
                    }
                    for (place, packed) in packed.iter_mut().enumerate() {
                        let input = word * per_word + place;
                        if input < inputs {
                            *packed = value(output, input);
                        }
                    }
                }
            }
        }
        data
    }
}

/// The first `len` elements of `buffer`, which is lengthened (with default values) if it is
/// shorter but never shortened: a buffer reused for passes or layers of varying sizes is
/// zeroed once, when it first reaches a size, instead of at every growth after a shrink.
/// For buffers whose every element is written before it is read.
pub(super) fn grown<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// Rows per parallel task of the bf16 and int8 kernels (a multiple of the AMX kernels' 32).
pub(super) const MC: usize = 64;

/// The shared frame of the bf16 and int8 products `out (+)= x Wᵀ`: checks the shapes, sizes
/// `scratch` for `words` 32-bit words of converted activations per row (rows rounded up to
/// `pad_rows`, for AMX), and runs `block(x, a, out)` on blocks of [`MC`] rows in parallel —
/// with `start` written into each output block first and its `then` applied after.
///
/// # Panics
///
/// If `x` (`rows × inputs`) and `out` (`rows × outputs`) do not have the same number of
/// rows, or `start` does not fit `out` (bugs of the caller).
pub(super) fn par_blocks(
    (x, inputs): (&[f32], usize),
    (out, outputs): (&mut [f32], usize),
    (scratch, words, pad_rows): (&mut Vec<u32>, usize, usize),
    start: Option<Start<'_>>,
    block: impl Fn(&[f32], &mut [u32], &mut [f32]) + Sync,
) {
    let (k, n) = (inputs, outputs);
    if k == 0 || n == 0 {
        return;
    }
    let rows = x.len() / k;
    assert!(
        x.len() == rows * k && out.len() == rows * n,
        "matrix shapes"
    );
    if let Some(start) = start {
        assert!(
            start.bias.len() == n && start.residual.is_none_or(|r| r.len() == out.len()),
            "start shapes"
        );
    }
    // Padding rows' sums are computed and discarded; `MC` is a multiple of `pad_rows`, so
    // the chunks of `scratch`, `x` and `out` pair up. `scratch` only grows: the layers of a
    // pass share it with different `words`, and shrinking it would zero the difference
    // again, serially on the calling thread, at every layer.
    let scratch = grown(scratch, rows.next_multiple_of(pad_rows.max(1)) * words);
    scratch
        .par_chunks_mut(MC * words)
        .zip(x.par_chunks(MC * k))
        .zip(out.par_chunks_mut(MC * n))
        .enumerate()
        .for_each(|(index, ((a, x), out))| {
            if let Some(start) = start {
                start.write(out, index * MC);
            }
            block(x, a, out);
            if let Some(then) = start.and_then(|s| s.then) {
                then(out);
            }
        });
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
    fn grown_buffers_never_shrink_and_keep_their_contents() {
        let mut buffer: Vec<u32> = Vec::new();
        grown(&mut buffer, 6).copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        // A smaller request: a prefix, the rest kept (not zeroed again later).
        assert_eq!(grown(&mut buffer, 2), &[1, 2]);
        assert_eq!(buffer.len(), 6);
        // A larger one: the old contents stay, only the new tail is zero.
        assert_eq!(grown(&mut buffer, 8), &[1, 2, 3, 4, 5, 6, 0, 0]);
        assert!(grown(&mut buffer, 0).is_empty());
        assert_eq!(buffer.len(), 8);
    }

    #[test]
    fn packs_each_value_at_its_panel_word_column_and_place() {
        // 5 outputs × 7 inputs, panels of 2 outputs, 4 inputs per word: 3 panels × 2 words.
        let packing = Packing {
            words: 2,
            width: 2,
            panels: 3,
        };
        let (outputs, inputs, per_word) = (5, 7, 4);
        let value = |o: usize, i: usize| (10 * o + i + 1) as i32;
        let data = packing.pack(per_word, outputs, inputs, value);
        assert_eq!(data.len(), 3 * 2 * 2 * 4);
        for (at, &packed) in data.iter().enumerate() {
            let (place, column) = (at % per_word, at / per_word % 2);
            let (word, panel) = (at / (per_word * 2) % 2, at / (per_word * 2 * 2));
            let (o, i) = (panel * 2 + column, word * per_word + place);
            let expected = if o < outputs && i < inputs {
                value(o, i)
            } else {
                0
            };
            assert_eq!(packed, expected, "output {o}, input {i}");
        }
        // The first word of panel 0: output 0's inputs 0..4, then output 1's.
        assert_eq!(&data[..8], &[1, 2, 3, 4, 11, 12, 13, 14]);
        // Pairs (2 per word) in the same frame.
        let pairs = Packing {
            words: 4,
            width: 2,
            panels: 3,
        }
        .pack(2, outputs, inputs, value);
        assert_eq!(&pairs[..6], &[1, 2, 11, 12, 3, 4]);
        assert_eq!(&pairs[12..16], &[7, 0, 17, 0]);
    }

    #[test]
    fn masks_cover_exactly_the_columns() {
        assert_eq!(lane_masks(48), [0xffff; 3]);
        assert_eq!(lane_masks(20), [0xffff, 0x000f, 0]);
        assert_eq!(lane_masks(1), [1, 0, 0]);
    }

    #[test]
    fn amx_packing_pads_to_whole_steps_and_panel_pairs() {
        assert_eq!(
            Packing::new(50, 7, 4, false),
            Packing {
                words: 2,
                width: 48,
                panels: 2
            }
        );
        assert_eq!(
            Packing::new(50, 7, 4, true),
            Packing {
                words: 16,
                width: 16,
                panels: 4
            }
        );
        assert_eq!(
            Packing::new(384, 384, 2, true),
            Packing {
                words: 192,
                width: 16,
                panels: 24
            }
        );
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

/// Test helpers shared by the bf16 and int8 kernels' tests.
#[cfg(test)]
pub(super) mod testing {
    use super::Start;

    /// Deterministic values in [-1, 1).
    pub(in crate::embed::candle) fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                // The top 24 bits, exactly representable in f32.
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Asserts that a product with a [`Start`] (bias, with and without a residual) is
    /// bit-identical to the same start written into the output first and the product added
    /// to it, with more rows than one parallel block (so the residual's per-block offsets
    /// count) and garbage in the output. `pack` packs a `outputs × inputs` weight; `matmul`
    /// is the packed weight's product.
    pub(in crate::embed::candle) fn fused_start_matches_a_separate_pass<W>(
        pack: impl FnOnce(&[f32], usize, usize) -> W,
        matmul: impl Fn(&W, &[f32], &mut [f32], &mut Vec<u32>, Option<Start<'_>>),
    ) {
        let (rows, inputs, outputs) = (150, 96, 40);
        let x = values(rows * inputs, 11);
        let w = values(outputs * inputs, 12);
        let bias = values(outputs, 13);
        let residual = values(rows * outputs, 14);
        let packed = pack(&w, outputs, inputs);
        for residual in [None, Some(&residual[..])] {
            let mut expected: Vec<f32> = (0..rows * outputs)
                .map(|i| bias[i % outputs] + residual.map_or(0.0, |r| r[i]))
                .collect();
            let mut scratch = Vec::new();
            matmul(&packed, &x, &mut expected, &mut scratch, None);
            // Garbage in `out`: the start replaces it.
            let mut out = vec![f32::NAN; rows * outputs];
            let start = Start {
                bias: &bias,
                residual,
                then: None,
            };
            matmul(&packed, &x, &mut out, &mut scratch, Some(start));
            assert!(
                out.iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "residual {}: the fused start differs",
                residual.is_some()
            );
        }
    }
}
