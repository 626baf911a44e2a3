//! Attention's two products on AVX-512 VNNI's `vpdpwssd` (pairs of i16, exact i32 sums), for
//! CPUs whose `vdpbf16ps` is slow or absent (Intel Cascade Lake, Ice Lake, Sapphire and
//! Emerald Rapids): `vpdpwssd` issues as often as an f32 FMA there with twice its
//! multiply-adds (docs/performance.md).
//!
//! Scales, chosen so that every product sums exactly in i32 (symmetric, no zero point):
//!
//! - scores: Q and K per token, at most [`qk_levels`] (`d · L² < 2³¹`: ±8,191 at 32
//!   channels), so `score = sq · sk · Σ q·k`;
//! - context: the softmax numerators `e^(s − max) ∈ [0, 1]` per row (the largest is 1) and V
//!   per channel, at most [`pv_levels`] each (`keys · L² < 2³¹`: ±2,896 at 256 keys), so
//!   `out = sv / (L · Σe) · Σ p·v`, with the sum `Σe` of the unrounded numerators in f32
//!   (as the bf16 kernels do).
//!
//! The layouts are the bf16 kernels' (module [`super`]), with i16 in place of bf16.

/// Proof that the CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Vnni(());

/// Proof that the CPU has AVX-512F, AVX-512BW and AVX-512 VNNI (none elsewhere).
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy)]
pub(super) enum Vnni {}

impl Vnni {
    /// The proof, if this CPU has the features.
    ///
    /// # Errors
    ///
    /// A message naming the missing features.
    pub(super) fn detect() -> Result<Self, String> {
        match super::super::int8::vnni_missing() {
            Some(missing) => Err(format!("this CPU lacks {missing}")),
            #[cfg(target_arch = "x86_64")]
            None => Ok(Self(())),
            #[cfg(not(target_arch = "x86_64"))]
            None => Err("int16 attention needs x86_64".to_owned()),
        }
    }
}

/// The largest level of Q and K for heads of `d` channels: `d · L² ≤ i32::MAX`, at most
/// `i16::MAX`.
fn qk_levels(d: usize) -> i32 {
    levels(d)
}

/// The largest level of the numerators and of V for `keys` keys: `keys · L² ≤ i32::MAX`
/// (each numerator is at most `L`, each `|v|` at most `L`), at most `i16::MAX`.
fn pv_levels(keys: usize) -> i32 {
    levels(keys)
}

/// `floor(√(i32::MAX / terms))`, at most `i16::MAX`: `terms` products of two values of at
/// most that size sum exactly in i32.
fn levels(terms: usize) -> i32 {
    let bound = f64::from(i32::MAX) / terms.max(1) as f64;
    // Positive and at most 32,767, so the cast is exact.
    bound.sqrt().floor().min(f64::from(i16::MAX)) as i32
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::{
        __m512, __m512i, _CMP_GT_OQ, _mm256_storeu_si256, _mm512_abs_ps, _mm512_and_si512,
        _mm512_castsi256_si512, _mm512_cmp_ps_mask, _mm512_cvtepi32_epi16, _mm512_cvtepi32_ps,
        _mm512_cvtps_epi32, _mm512_div_ps, _mm512_inserti64x4, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_mask_blend_ps, _mm512_max_ps, _mm512_min_epi32, _mm512_mul_ps, _mm512_or_si512,
        _mm512_reduce_max_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_setzero_si512, _mm512_slli_epi32, _mm512_storeu_ps, _mm512_storeu_si512,
    };

    use super::super::super::int8::x86::dpwssd;
    use super::super::x86::{LANES, numerators};
    use super::super::{Heads, KEYS, MR, Scratch};
    use super::{pv_levels, qk_levels};

    /// One head: Q and K per token, V per channel to i16, then for each block of [`MR`]
    /// query rows the scores, their softmax, and the context.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI; every token `t < len` of Q, K
    /// and V (`d` values at `q/k/v + t·stride`) must lie inside `heads.data`; `out` must hold
    /// `len × d` values; `d` must be a multiple of 16 up to 64 and `len > 0`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(in super::super) unsafe fn head(
        heads: Heads<'_>,
        d: usize,
        len: usize,
        s: &mut Scratch,
        out: &mut [f32],
    ) {
        let pairs = d / 2;
        let rows = len.next_multiple_of(MR);
        let groups = len.div_ceil(2 * KEYS) * 2;
        let width = groups * KEYS;
        let token_pairs = len.div_ceil(2);
        // Levels as f32: exact (at most 32,767).
        let qk = qk_levels(d) as f32;
        let pv = pv_levels(2 * token_pairs) as f32;
        s.q.clear();
        s.q.resize(rows * pairs, 0);
        s.k.clear();
        s.k.resize(width * pairs, 0);
        s.v.clear();
        s.v.resize(token_pairs * d, 0);
        s.q_scales.clear();
        s.q_scales.resize(rows, 0.0);
        s.k_scales.clear();
        s.k_scales.resize(width, 0.0);
        s.v_scales.clear();
        s.v_scales.resize(d, 0.0);
        s.scores.resize(MR * width, 0.0);
        s.p.resize(MR * width / 2, 0);
        let row = |offset: usize, t: usize| {
            let at = offset + t * heads.stride;
            &heads.data[at..at + d]
        };
        for t in 0..len {
            s.q_scales[t] = quantise_token(row(heads.q, t), qk, &mut s.q[t * pairs..][..pairs]);
            let mut words = [0u32; 32];
            s.k_scales[t] = quantise_token(row(heads.k, t), qk, &mut words[..pairs]);
            let (group, key) = (t / KEYS, t % KEYS);
            for (pair, &word) in words[..pairs].iter().enumerate() {
                s.k[(group * pairs + pair) * KEYS + key] = word;
            }
        }
        // V per channel: its largest magnitude over the tokens, to `pv` levels.
        let vectors = d / LANES;
        let mut largest = [_mm512_setzero_ps(); 4];
        for t in 0..len {
            for (i, largest) in largest[..vectors].iter_mut().enumerate() {
                // SAFETY: `row` holds `d ≥ 16(i + 1)` values.
                let v = unsafe { _mm512_loadu_ps(row(heads.v, t).as_ptr().add(i * LANES)) };
                *largest = _mm512_max_ps(*largest, _mm512_abs_ps(v));
            }
        }
        let mut inverse_scales = [_mm512_setzero_ps(); 4];
        for (i, (&largest, inverse)) in largest[..vectors]
            .iter()
            .zip(&mut inverse_scales)
            .enumerate()
        {
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(largest, _mm512_setzero_ps());
            let levels = _mm512_set1_ps(pv);
            // Channels that are all zero keep scale and inverse 0 (the blend; no 0/0).
            *inverse = _mm512_mask_blend_ps(
                positive,
                _mm512_setzero_ps(),
                _mm512_div_ps(levels, largest),
            );
            // SAFETY: `s.v_scales` holds `d ≥ 16(i + 1)` values.
            unsafe {
                _mm512_storeu_ps(
                    s.v_scales.as_mut_ptr().add(i * LANES),
                    _mm512_div_ps(largest, levels),
                );
            }
        }
        for pair in 0..token_pairs {
            let first = row(heads.v, 2 * pair);
            let second = (2 * pair + 1 < len).then(|| row(heads.v, 2 * pair + 1));
            interleave(
                first,
                second,
                &inverse_scales[..vectors],
                &mut s.v[pair * d..(pair + 1) * d],
            );
        }
        let p_width = width / 2;
        for r0 in (0..len).step_by(MR) {
            let valid = (len - r0).min(MR);
            // SAFETY: `s.q` holds rows `r0..r0 + MR` of `pairs` words and `s.q_scales` their
            // scales, `s.k` `groups` (even) groups of keys and `s.k_scales` `width` scales,
            // `s.scores` `MR × width` values.
            unsafe { scores(s, r0, pairs, groups) };
            let mut inverse = [0f32; MR];
            for (r, inverse) in inverse.iter_mut().enumerate() {
                let row = &s.scores[r * width..(r + 1) * width];
                let p = &mut s.p[r * p_width..(r + 1) * p_width];
                // Rows past the last query get zero numerators (and are not written).
                let sum = probabilities(row, if r < valid { len } else { 0 }, pv, p);
                *inverse = if sum > 0.0 { 1.0 / (sum * pv) } else { 0.0 };
            }
            let out = &mut out[r0 * d..(r0 + valid) * d];
            // SAFETY: `s.p` holds `MR` rows of `p_width ≥ token_pairs` words, `s.v`
            // `token_pairs × d` words, `s.v_scales` `d`, `out` `valid` rows of `d`.
            unsafe {
                match vectors {
                    1 => context::<8, 1>(s, 0, (p_width, token_pairs), &inverse, valid, out),
                    2 => context::<8, 2>(s, 0, (p_width, token_pairs), &inverse, valid, out),
                    3 => {
                        context::<4, 3>(s, 0, (p_width, token_pairs), &inverse, valid, out);
                        context::<4, 3>(s, 4, (p_width, token_pairs), &inverse, valid, out);
                    }
                    _ => {
                        context::<4, 4>(s, 0, (p_width, token_pairs), &inverse, valid, out);
                        context::<4, 4>(s, 4, (p_width, token_pairs), &inverse, valid, out);
                    }
                }
            }
        }
    }

    /// 16 i32 (each within ±32,767) as 16 i16, in order.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn narrow(v: __m512i) -> std::arch::x86_64::__m256i {
        _mm512_cvtepi32_epi16(v)
    }

    /// One token's `x` (a multiple of 16 values) to i16 pairs of consecutive channels in
    /// `words` (`x.len() / 2`), symmetric to `levels`; returns the scale (`x ≈ scale · q`;
    /// 0 for a token of zeros, which then stays zeros).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn quantise_token(x: &[f32], levels: f32, words: &mut [u32]) -> f32 {
        let mut m = _mm512_setzero_ps();
        for chunk in x.chunks_exact(LANES) {
            // SAFETY: `chunk` holds 16 f32.
            m = _mm512_max_ps(m, _mm512_abs_ps(unsafe { _mm512_loadu_ps(chunk.as_ptr()) }));
        }
        let largest = _mm512_reduce_max_ps(m);
        if largest <= 0.0 {
            words.fill(0);
            return 0.0;
        }
        let inverse = _mm512_set1_ps(levels / largest);
        for (chunk, words) in x.chunks_exact(LANES).zip(words.chunks_exact_mut(LANES / 2)) {
            // SAFETY: `chunk` holds 16 f32, `words` 8 words (32 bytes). Rounded to nearest
            // even (the default MXCSR mode): |q| ≤ levels ≤ 32,767.
            unsafe {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(chunk.as_ptr()), inverse));
                _mm256_storeu_si256(words.as_mut_ptr().cast(), narrow(q));
            }
        }
        largest / levels
    }

    /// The `d` channels of tokens `first` and `second` (zero if absent), each times its
    /// channel's inverse scale (`inverse`, 16 channels per vector) and rounded, as `d` words:
    /// `first`'s i16 in the low half, `second`'s in the high half.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn interleave(first: &[f32], second: Option<&[f32]>, inverse: &[__m512], words: &mut [u32]) {
        let level = |x: &[f32], i: usize| -> __m512i {
            // SAFETY: `x` holds `d = 16 · inverse.len()` values, so `16(i + 1) ≤ d`. Rounded
            // to nearest even: within ±levels.
            unsafe {
                _mm512_cvtps_epi32(_mm512_mul_ps(
                    _mm512_loadu_ps(x.as_ptr().add(i * LANES)),
                    inverse[i],
                ))
            }
        };
        let low_half = _mm512_set1_epi32(0xffff);
        for (i, words) in words
            .chunks_exact_mut(LANES)
            .enumerate()
            .take(inverse.len())
        {
            let low = _mm512_and_si512(level(first, i), low_half);
            let high = second.map_or(_mm512_setzero_si512(), |x| {
                _mm512_slli_epi32::<16>(level(x, i))
            });
            // SAFETY: `words` holds 16 words.
            unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), _mm512_or_si512(low, high)) };
        }
    }

    /// The f32 scores of query rows `r0..r0 + MR` against every key group, into `s.scores`
    /// (`MR × groups·16`): two groups of keys at a time in 16 accumulators, each sum times
    /// its row's and key's scales.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F/BW/VNNI; `s.q` must hold rows `r0..r0 + MR` of `pairs`
    /// words (each sum of `2·pairs` products within i32) and `s.q_scales` their scales,
    /// `s.k` `groups` (even) groups of `pairs × 16` words and `s.k_scales` `groups·16`
    /// scales, `s.scores` `MR × groups·16` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn scores(s: &mut Scratch, r0: usize, pairs: usize, groups: usize) {
        let width = groups * KEYS;
        let q = s.q[r0 * pairs..].as_ptr();
        let k = s.k.as_ptr();
        let scores = s.scores.as_mut_ptr();
        for g in (0..groups).step_by(2) {
            let mut acc = [[_mm512_setzero_si512(); 2]; MR];
            for pair in 0..pairs {
                // SAFETY: groups `g` and `g + 1 < groups` hold `pairs` blocks of 16 words;
                // row `r < MR` of the block holds `pairs` words (caller's contract).
                unsafe {
                    let b0 = _mm512_loadu_si512(k.add((g * pairs + pair) * KEYS).cast());
                    let b1 = _mm512_loadu_si512(k.add(((g + 1) * pairs + pair) * KEYS).cast());
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_epi32(q.add(r * pairs + pair).read().cast_signed());
                        acc[0] = dpwssd(acc[0], a, b0);
                        acc[1] = dpwssd(acc[1], a, b1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row_scale = _mm512_set1_ps(s.q_scales[r0 + r]);
                for (h, &acc) in acc.iter().enumerate() {
                    let column = (g + h) * KEYS;
                    // SAFETY: `s.k_scales` holds `width ≥ column + 16` values, row `r < MR`
                    // of `s.scores` `width` values.
                    unsafe {
                        let scales = _mm512_mul_ps(
                            _mm512_loadu_ps(s.k_scales.as_ptr().add(column)),
                            row_scale,
                        );
                        _mm512_storeu_ps(
                            scores.add(r * width + column),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scales),
                        );
                    }
                }
            }
        }
    }

    /// The softmax numerators `e^(s − max)` of the first `len` scores of `row` (a multiple
    /// of 32 long), times `levels` and rounded, as i16 pairs of consecutive keys into `p`
    /// (`row.len() / 2` words; zero past `len`); returns the sum of the unrounded
    /// numerators, by which the context is divided.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn probabilities(row: &[f32], len: usize, levels: f32, p: &mut [u32]) -> f32 {
        let scale = _mm512_set1_ps(levels);
        // Exact: levels ≤ 32,767.
        let ceiling = _mm512_set1_epi32(levels as i32);
        numerators(row, len, |chunk, low, high| {
            // At most `levels` (a numerator may exceed 1 by an ulp).
            let level = |e: __m512| {
                narrow(_mm512_min_epi32(
                    _mm512_cvtps_epi32(_mm512_mul_ps(e, scale)),
                    ceiling,
                ))
            };
            let keys = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(level(low)), level(high));
            if let Some(words) = p.get_mut(chunk * LANES..(chunk + 1) * LANES) {
                // SAFETY: `words` holds 16 words.
                unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), keys) };
            }
        })
    }

    /// `out = (P V) · inverse · sv` for rows `first..first + R` of the block (only those below
    /// `valid` are written): `R` rows × `DV` vectors of accumulators.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F/BW/VNNI; `s.p` must hold `first + R` rows of
    /// `p_width ≥ token_pairs` words, `s.v` `token_pairs × d` words with `d = 16·DV` (each
    /// sum of `2·token_pairs` products within i32), `s.v_scales` `d` scales, `out` `valid`
    /// rows of `d`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn context<const R: usize, const DV: usize>(
        s: &Scratch,
        first: usize,
        (p_width, token_pairs): (usize, usize),
        inverse: &[f32; MR],
        valid: usize,
        out: &mut [f32],
    ) {
        let d = DV * LANES;
        let p = s.p[first * p_width..].as_ptr();
        let v = s.v.as_ptr();
        let mut acc: [[__m512i; DV]; R] = [[_mm512_setzero_si512(); DV]; R];
        for pair in 0..token_pairs {
            // SAFETY: pair `pair < token_pairs` of V holds `d = 16·DV` words; row
            // `first + r` of P holds `p_width > pair` words (caller's contract).
            unsafe {
                let mut b = [_mm512_setzero_si512(); DV];
                for (i, b) in b.iter_mut().enumerate() {
                    *b = _mm512_loadu_si512(v.add(pair * d + i * LANES).cast());
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_epi32(p.add(r * p_width + pair).read().cast_signed());
                    for (acc, b) in acc.iter_mut().zip(&b) {
                        *acc = dpwssd(*acc, a, *b);
                    }
                }
            }
        }
        let mut channel_scales = [_mm512_setzero_ps(); DV];
        for (i, scales) in channel_scales.iter_mut().enumerate() {
            // SAFETY: `s.v_scales` holds `d ≥ 16(i + 1)` values.
            *scales = unsafe { _mm512_loadu_ps(s.v_scales.as_ptr().add(i * LANES)) };
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = first + r;
            if row >= valid {
                break;
            }
            let scale = _mm512_set1_ps(inverse[row]);
            for (i, &acc) in acc.iter().enumerate() {
                let value = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), channel_scales[i]);
                // SAFETY: row `row < valid` of `out` holds `d ≥ 16(i + 1)` values.
                unsafe {
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(row * d + i * LANES),
                        _mm512_mul_ps(value, scale),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_keep_every_sum_inside_i32() {
        for terms in [1, 2, 16, 32, 48, 64, 256, 512, 1024] {
            let l = i64::from(levels(terms));
            assert!((1..=i64::from(i16::MAX)).contains(&l), "{terms}: {l}");
            assert!(terms as i64 * l * l <= i64::from(i32::MAX), "{terms}: {l}");
            // And as large as that allows (or i16's limit).
            let next = l + 1;
            assert!(
                l == i64::from(i16::MAX) || terms as i64 * next * next > i64::from(i32::MAX),
                "{terms}: {l}"
            );
        }
        assert_eq!(qk_levels(32), 8191);
        assert_eq!(pv_levels(256), 2896);
    }
}
