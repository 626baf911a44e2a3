//! The int8 product on AVX2 (no AVX-512 VNNI): int8 weights widened to i16, activations
//! quantised per row to i16, multiplied in pairs by `vpmaddwd` (`a₀·q₀ + a₁·q₁` into each
//! i32 lane) and summed exactly in i32.
//!
//! AVX2 has no `u8 × i8` dot product that cannot saturate (`vpmaddubsw` saturates its i16
//! pair sums), so this kernel widens: sixteen multiply-adds per instruction, twice an f32
//! FMA's eight, and half the weight bytes of f32. Since the activations are i16 anyway, they
//! get as many levels as the i32 sums allow: symmetric, `|a| ≤ L` with
//! `inputs · 127 · L < 2³¹` ([`activation_levels`]), so the kernel's sums are exact and
//! the activations' rounding error is 1/40 or less of VNNI's u8 one.
//!
//! The output tile is 6 rows × 16 columns in twelve ymm accumulators (of sixteen), with two
//! for the weights, one for the broadcast activations and one for each product before it
//! is added. (4 × 24 also takes twelve accumulators but needs seventeen registers: the
//! spilled one cost a store-to-load round trip per step, and the kernel ran at 1.11× f32.)
//! On Zen 3 a step (2 loads, 6 broadcasts, 12 `vpmaddwd`, 12 `vpaddd`) takes 7.5 cycles,
//! exactly what the 24 multiply and add instructions alone take there: the loop runs at
//! the limit of its instruction mix (in a microbenchmark, 3 rows × 32 columns, with half
//! the broadcasts, took as long per multiply-add). The tile's epilogue and the outlier
//! channels use masked loads and stores only on a partial vector: AMD microcodes masked
//! stores, and using them on every vector cost 12 % of the int16 pass on Zen 3.

use super::super::tile::Packing;
use super::{Int8Weight, RowQuant};

/// Columns of an output tile: two vectors of 8 i32 lanes.
pub(super) const NR: usize = 16;
/// Vectors per row of an output tile.
const VECTORS: usize = NR / LANES;
/// Rows of an output tile.
const MR: usize = 6;
/// 32-bit lanes of a 256-bit vector.
const LANES: usize = 8;
/// Vectors of outputs the outlier channels' f32 products take at once.
const OUTLIER_VECTORS: usize = 4;

/// The packing of `outputs × inputs` weights for this kernel: pairs of inputs (one 32-bit
/// word of two i16), panels of [`NR`] outputs.
pub(super) fn packing(outputs: usize, inputs: usize) -> Packing {
    Packing {
        words: inputs.div_ceil(2),
        width: NR,
        panels: outputs.div_ceil(NR),
    }
}

/// The largest magnitude of a quantised activation for products of `inputs` terms with
/// weights within `±weight_levels`: each term is at most `weight_levels · L`, so
/// `L = (2³¹ − 1) / (weight_levels · 2 · pairs)`, at most `i16::MAX` (and at least 1).
pub(super) fn activation_levels(inputs: usize, weight_levels: i16) -> i32 {
    let terms = inputs.div_ceil(2).saturating_mul(2).max(1);
    let per_term = usize::from(weight_levels.unsigned_abs()).max(1);
    let levels = (i32::MAX as usize / per_term) / terms;
    // At most `i16::MAX`, so the cast is exact.
    levels.clamp(1, i16::MAX as usize) as i32
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{block, quantise_row};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_add_epi32, _mm256_and_ps, _mm256_castsi256_ps, _mm256_cmpgt_epi32,
        _mm256_cvtepi32_ps, _mm256_cvtps_epi32, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maskload_ps, _mm256_maskstore_ps,
        _mm256_max_epi32, _mm256_max_ps, _mm256_min_epi32, _mm256_mul_ps, _mm256_packs_epi32,
        _mm256_permute4x64_epi64, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32,
        _mm256_setzero_ps, _mm256_setzero_si256, _mm256_storeu_ps, _mm256_storeu_si256,
    };

    use super::super::MC;
    use super::{Int8Weight, LANES, MR, NR, OUTLIER_VECTORS, RowQuant, VECTORS};

    /// `out += x Wᵀ` for the rows of `x` (at most [`MC`]), quantising them into `a` first.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `w` must have been packed for this kernel; `x` must
    /// hold `rows × w.inputs` values, `out` `rows × w.outputs` and `a` at least
    /// `rows × w.quads` words, with `rows ≤ MC`.
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn block(
        x: &[f32],
        a: &mut [u32],
        out: &mut [f32],
        w: &Int8Weight,
    ) {
        let (k, n, pairs) = (w.inputs, w.outputs, w.quads);
        let rows = out.len() / n;
        let mut quant = [RowQuant {
            scale: 1.0,
            zero: 0,
        }; MC];
        for ((x, a), q) in x
            .chunks_exact(k)
            .zip(a.chunks_exact_mut(pairs))
            .zip(quant.iter_mut())
        {
            *q = quantise_row(x, w.unsmooth.as_deref(), w.levels, a);
        }
        add_outliers(x, out, w);
        for panel in 0..n.div_ceil(NR) {
            let columns = (n - panel * NR).min(NR);
            let masks = lane_masks(columns);
            let b = &w.pairs[panel * pairs * NR * 2..(panel + 1) * pairs * NR * 2];
            let scales = &w.scales[panel * NR..(panel + 1) * NR];
            for r0 in (0..rows).step_by(MR) {
                let a = &a[r0 * pairs..];
                let out = &mut out[r0 * n + panel * NR..];
                let epilogue = Epilogue {
                    scales,
                    quant: &quant[r0..],
                    masks,
                    whole: columns == NR,
                    ldc: n,
                };
                // SAFETY (all arms): the tile's rows `r0..r0 + R` exist (`R ≤ rows - r0`), so
                // `a` holds `R` rows of `pairs` words, `quant` `R` entries, `b` holds
                // `pairs × NR × 2` values and `out` reaches row `R - 1`, column
                // `columns - 1` (masked beyond); the CPU features are this function's own
                // precondition.
                unsafe {
                    match rows - r0 {
                        6.. => tile::<6>(a, pairs, b, out, &epilogue),
                        5 => tile::<5>(a, pairs, b, out, &epilogue),
                        4 => tile::<4>(a, pairs, b, out, &epilogue),
                        3 => tile::<3>(a, pairs, b, out, &epilogue),
                        2 => tile::<2>(a, pairs, b, out, &epilogue),
                        _ => tile::<1>(a, pairs, b, out, &epilogue),
                    }
                }
            }
        }
    }

    /// Masks (all ones in a lane to keep) of the 8-lane vectors of an output panel of which
    /// only `columns` exist.
    #[target_feature(enable = "avx2,fma")]
    fn lane_masks(columns: usize) -> [__m256i; VECTORS] {
        std::array::from_fn(|v| {
            // At most 8, so the cast is exact.
            let lanes = columns.saturating_sub(v * LANES).min(LANES) as i32;
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(lanes),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        })
    }

    /// `out += x[:, outliers] · W[:, outliers]ᵀ` in f32, for the rows of `x` and `out`: 32
    /// outputs at a time where whole (four independent sums, so that the multiply-adds do
    /// not wait on each other's latency), then 8, each loaded and stored once per 16 outlier
    /// channels.
    #[target_feature(enable = "avx2,fma")]
    fn add_outliers(x: &[f32], out: &mut [f32], w: &Int8Weight) {
        const GROUP: usize = 16;
        let n = w.outputs;
        for (x, out) in x.chunks_exact(w.inputs).zip(out.chunks_exact_mut(n)) {
            for (channels, weights) in w
                .outliers
                .chunks(GROUP)
                .zip(w.outlier_weights.chunks(GROUP * n))
            {
                let mut values = [0f32; GROUP];
                for (v, &j) in values.iter_mut().zip(channels) {
                    *v = x[j];
                }
                let values = &values[..channels.len()];
                // Whole vectors with plain loads and stores (see the module's documentation).
                let whole = n - n % LANES;
                let blocks = n - n % (LANES * OUTLIER_VECTORS);
                let (out, weights) = (out.as_mut_ptr(), weights.as_ptr());
                // SAFETY (both loops): the columns `c0..c0 + 8V` that a call adds to are
                // whole (`c0 + 8V ≤ blocks` or `≤ whole`, both `≤ n`), so they are in `out`'s
                // row and in each of `weights`' `values.len()` rows of `n` values.
                for c0 in (0..blocks).step_by(LANES * OUTLIER_VECTORS) {
                    unsafe {
                        add_outlier_columns::<OUTLIER_VECTORS>(
                            out.add(c0),
                            weights.add(c0),
                            n,
                            values,
                        )
                    };
                }
                for c0 in (blocks..whole).step_by(LANES) {
                    unsafe { add_outlier_columns::<1>(out.add(c0), weights.add(c0), n, values) };
                }
                if whole < n {
                    let mask = lane_masks(n - whole)[0];
                    // SAFETY: lanes inside `mask` are columns `whole..n` of `out`'s row and of
                    // each of `weights`' `values.len()` rows of `n` values; lanes outside are
                    // neither read nor written.
                    unsafe {
                        let p = out.add(whole);
                        let mut acc = _mm256_maskload_ps(p, mask);
                        for (o, &v) in values.iter().enumerate() {
                            let weight = _mm256_maskload_ps(weights.add(o * n + whole), mask);
                            acc = _mm256_fmadd_ps(_mm256_set1_ps(v), weight, acc);
                        }
                        _mm256_maskstore_ps(p, mask, acc);
                    }
                }
            }
        }
    }

    /// `out[0..8V] += Σ_o values[o] · weights[o·n..o·n + 8V]` in f32, with `V` independent
    /// sums (plain loads and stores: whole vectors only).
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `out` must reach `8V` values and `weights`
    /// `values.len()` rows, `n` apart, of `8V` values each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn add_outlier_columns<const V: usize>(
        out: *mut f32,
        weights: *const f32,
        n: usize,
        values: &[f32],
    ) {
        // SAFETY: every load and store stays within the `8V` values of `out` or of a row of
        // `weights` (this function's contract).
        unsafe {
            let mut acc: [__m256; V] = std::array::from_fn(|i| _mm256_loadu_ps(out.add(i * LANES)));
            for (o, &v) in values.iter().enumerate() {
                let value = _mm256_set1_ps(v);
                let row = weights.add(o * n);
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(value, _mm256_loadu_ps(row.add(i * LANES)), *acc);
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(i * LANES), *acc);
            }
        }
    }

    /// What turns a tile's i32 sums into f32 and adds them to the output.
    struct Epilogue<'a> {
        /// The panel's output scales ([`NR`]).
        scales: &'a [f32],
        /// The tile's rows' quantisation (from its first row on).
        quant: &'a [RowQuant],
        masks: [__m256i; VECTORS],
        /// Whether all [`NR`] columns of the panel exist: plain loads and stores then, not
        /// masked ones (microcoded and slow on AMD), which only the last panel of a layer
        /// whose outputs are not a multiple of 16 needs.
        whole: bool,
        ldc: usize,
    }

    /// One row of activations (multiplied by `unsmooth`, if any) to i16 pairs within
    /// `±levels` (zero after the last input); returns its quantisation (`zero` is 0).
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) fn quantise_row(
        x: &[f32],
        unsmooth: Option<&[f32]>,
        levels: i32,
        a: &mut [u32],
    ) -> RowQuant {
        // Two vectors (16 values, 8 words) at a time.
        const STEP: usize = 2 * LANES;
        let steps = x.len() / STEP;
        let value = |i: usize| -> f32 {
            let v = x[i];
            unsmooth.map_or(v, |u| v * u[i])
        };
        // SAFETY: every load reads 8 f32 at `i`, with `i + 8 ≤ 16 · steps ≤ len`, inside `x`
        // (and `unsmooth`, which has the same length).
        let load = |i: usize| -> __m256 {
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                match unsmooth {
                    Some(u) => _mm256_mul_ps(v, _mm256_loadu_ps(u.as_ptr().add(i))),
                    None => v,
                }
            }
        };
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let abs = |v: __m256| -> __m256 { _mm256_and_ps(v, abs_mask) };
        let mut high = _mm256_setzero_ps();
        for i in 0..2 * steps {
            high = _mm256_max_ps(high, abs(load(LANES * i)));
        }
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), high) };
        let mut max = lanes.iter().fold(0f32, |m, &v| m.max(v));
        for i in STEP * steps..x.len() {
            max = max.max(value(i).abs());
        }
        // NaN or infinite activations (a broken model) give scale 1, like an all-zero row:
        // the row's vector is garbage either way, and nothing here may overflow.
        let scale = if max > 0.0 && max.is_finite() {
            max / levels as f32
        } else {
            1.0
        };
        let inverse = _mm256_set1_ps(1.0 / scale);
        let (floor, ceiling) = (_mm256_set1_epi32(-levels), _mm256_set1_epi32(levels));
        let words = a.as_mut_ptr();
        for i in 0..steps {
            // Rounds to nearest even (the default MXCSR mode), then clamps to ±levels (out
            // of range, NaN gives i32::MIN: clamped too).
            let quantise = |v: __m256| -> __m256i {
                let q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse));
                _mm256_min_epi32(_mm256_max_epi32(q, floor), ceiling)
            };
            let lo = quantise(load(STEP * i));
            let hi = quantise(load(STEP * i + LANES));
            // `packs` interleaves the 128-bit halves (lo₀₋₃ hi₀₋₃ lo₄₋₇ hi₄₋₇); the
            // permutation restores input order. Values are within ±32,767: no saturation.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(lo, hi));
            // SAFETY: writes 8 words at word `8i`; `a` has `ceil(len / 2) ≥ 8(i + 1)` words.
            unsafe { _mm256_storeu_si256(words.add(LANES * i).cast(), packed) };
        }
        let halves = a.len() * 2;
        for i in STEP * steps..halves {
            let half = if i < x.len() {
                // Clamped to ±levels ≤ i16::MAX (NaN saturates to 0), so the cast is exact.
                ((value(i) / scale).round_ties_even() as i32).clamp(-levels, levels) as i16
            } else {
                0
            };
            let word = &mut a[i / 2];
            let bits = u32::from(half.cast_unsigned());
            *word = if i % 2 == 0 {
                (*word & 0xffff_0000) | bits
            } else {
                (*word & 0x0000_ffff) | (bits << 16)
            };
        }
        RowQuant { scale, zero: 0 }
    }

    /// `out[r][0..16] += sa[r]·sw·Σ_pairs a[r]·b` for `R` rows: the micro-kernel.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA; `a` must hold `R` rows of `pairs` words each, `pairs`
    /// apart, `b` `pairs × NR × 2` values, `e.quant` at least `R` entries, `e.scales` [`NR`],
    /// and `out` rows `e.ldc` apart reaching every lane set in `e.masks` of row `R - 1`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize>(
        a: &[u32],
        pairs: usize,
        b: &[i16],
        out: &mut [f32],
        e: &Epilogue<'_>,
    ) {
        let (a, b, out) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        let mut acc: [[__m256i; VECTORS]; R] = [[_mm256_setzero_si256(); VECTORS]; R];
        for pair in 0..pairs {
            // SAFETY: `pair < pairs`, so the two 32-byte loads stay inside `b`'s
            // `pairs × 32` values and `a` row `r` word `pair` inside `a` (caller's contract).
            unsafe {
                let bp = b.add(pair * NR * 2);
                let b0 = _mm256_loadu_si256(bp.cast());
                let b1 = _mm256_loadu_si256(bp.add(16).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32(a.add(r * pairs + pair).read().cast_signed());
                    // Exact: |Σ| ≤ inputs · weight levels · levels < 2³¹
                    // (`activation_levels`).
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b0));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, b1));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row_scale = _mm256_set1_ps(e.quant[r].scale);
            for (v, &sum) in acc.iter().enumerate() {
                // SAFETY: `e.scales` holds NR = 2 × 8 values. With `e.whole`, all 16 columns
                // of row `r` are in `out`; otherwise lanes outside the mask are neither read
                // nor written and those inside are in `out` (caller's contract).
                // (`wrapping_add`: a vector wholly past the last column may point past `out`.)
                unsafe {
                    let scales = _mm256_loadu_ps(e.scales.as_ptr().add(v * LANES));
                    let value = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), scales);
                    let p = out.wrapping_add(r * e.ldc + v * LANES);
                    if e.whole {
                        let old = _mm256_loadu_ps(p);
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(value, row_scale, old));
                    } else {
                        let mask = e.masks[v];
                        let old = _mm256_maskload_ps(p, mask);
                        _mm256_maskstore_ps(p, mask, _mm256_fmadd_ps(value, row_scale, old));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_keep_the_worst_sum_within_i32() {
        for weights in [127, 511, 2047] {
            for inputs in [1, 2, 7, 384, 1536, 4096, 100_000] {
                let levels = activation_levels(inputs, weights);
                assert!((1..=i32::from(i16::MAX)).contains(&levels));
                let worst = inputs.div_ceil(2) as i64 * 2 * i64::from(weights) * i64::from(levels);
                assert!(worst <= i64::from(i32::MAX), "{inputs} inputs: {worst}");
            }
        }
        assert_eq!(activation_levels(384, 127), i32::from(i16::MAX));
        assert_eq!(activation_levels(1536, 127), 11_008);
    }

    #[test]
    fn packs_pairs_of_inputs_per_output() {
        // 2 outputs × 3 inputs: pairs (0, 1) and (2, pad).
        let rows = [[1i16, 2, 3], [-4, -5, -6]];
        let packing = packing(2, 3);
        assert_eq!(
            packing,
            Packing {
                words: 2,
                width: NR,
                panels: 1
            }
        );
        let data = packing.pack(2, 2, 3, |o, i| rows[o][i]);
        assert_eq!(data.len(), 2 * NR * 2);
        assert_eq!(&data[..4], &[1, 2, -4, -5]);
        assert!(data[4..NR * 2].iter().all(|&v| v == 0));
        assert_eq!(&data[NR * 2..NR * 2 + 4], &[3, 0, -6, 0]);
    }
}
