//! Self-attention of one (sequence, head) with both products in a 16-bit format, for the
//! reduced-precision forward passes (bf16, int8, int16): `softmax(Q Kᵀ) V`.
//!
//! With the linear layers in bf16 or int8, attention's two f32 products were a third to
//! almost half of a pass (`perf`, docs/performance.md), the same cost in every precision.
//! Here Q, K, V and the softmax probabilities are rounded to 16 bits and the products run on
//! an instruction with two multiply-adds per 32-bit lane where f32 FMA does one; the scores,
//! the softmax and the sums stay f32. Two formats ([`ReducedAttention::name`]):
//!
//! - **bf16** (`vdpbf16ps`, f32 accumulation), where that instruction is fast (AMD Zen 4);
//!   bf16 keeps each element's own 8-bit precision, so a head's few large channels do not
//!   crush the rest (int8 attention, tried: per-token u8/s8 Q and K, u8 probabilities, fell
//!   below int8's fidelity bar);
//! - **int16** (AVX-512 VNNI's `vpdpwssd`, exact i32 accumulation, [`int16`]), where
//!   `vdpbf16ps` is slow or absent (Intel): Q and K per token, V per channel and the
//!   probabilities per row scaled to as many levels as exact i32 sums allow (±8,191 for Q/K
//!   at 32 channels, ±2,896 for P/V at 256 keys: finer than bf16's 8 bits for all but
//!   values far below their row's or channel's largest).
//!
//! Layouts (each 32-bit lane holds a pair of 16-bit values that multiply a pair):
//!
//! - Q: per token, pairs of consecutive channels (`d/2` words), broadcast one word at a time;
//! - K: in groups of 16 keys, for each channel pair the 16 keys' words side by side;
//! - probabilities: per query row, pairs of consecutive keys;
//! - V: for each pair of consecutive tokens, each channel's two values in one word.
//!
//! The forward pass gathers every head of a sequence in one pass over its QKV rows
//! ([`Packed`]) instead of reading each head's strided slices of them; int16 heads then run
//! [`ReducedAttention::head`] on the gathered copy, and for bf16 that function stays the
//! tests' reference.
//!
//! Head sizes that are multiples of 16 up to 64 are supported ([`ReducedAttention::bf16`]
//! says which); the fidelity of whole passes is checked by `tests/embed_precision.rs`.
//!
//! Everything `unsafe` here is reached only through a [`ReducedAttention`], which can only
//! be built after run-time detection of the CPU features its format needs.

use super::bf16::{Cpu, missing_features};
use super::tile::grown;

mod int16;

/// Query rows computed together (the kernels' register block).
const MR: usize = 8;
/// Keys per group: one vector of 16 f32 scores.
const KEYS: usize = 16;

/// Proof that the CPU runs one format's attention kernels, for one head size.
#[derive(Clone, Copy)]
pub(crate) struct ReducedAttention {
    format: Format,
    /// The head size, a multiple of 16 up to 64.
    d: usize,
}

/// The 16-bit format of the products, with the proof of the CPU features its kernels need.
#[derive(Clone, Copy)]
enum Format {
    /// `vdpbf16ps`: AVX-512F and AVX-512 BF16.
    Bf16(Cpu),
    /// `vpdpwssd`: AVX-512F, AVX-512BW and AVX-512 VNNI.
    Int16(int16::Vnni),
}

/// Where one head's Q, K and V are in the fused QKV activations: element `c` of token `t`
/// of Q is `data[q + t·stride + c]`, likewise for K and V.
#[derive(Clone, Copy)]
pub(crate) struct Heads<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

/// Working memory of one task (reused across heads; old contents never matter).
#[derive(Default)]
pub(crate) struct Scratch {
    /// Q in bf16 pairs, `rows × d/2` words (rows rounded up to [`MR`], zero past `len`).
    q: Vec<u32>,
    /// K: `groups × d/2 × 16` words (groups of 16 keys, an even count; zero past `len`).
    k: Vec<u32>,
    /// V: `ceil(len / 2) × d` words, each two tokens' values of one channel.
    v: Vec<u32>,
    /// One block's scores, then probabilities: `MR × groups·16`.
    scores: Vec<f32>,
    /// One block's probabilities in 16-bit pairs: `MR × groups·8` words.
    p: Vec<u32>,
    /// int16: Q's scale per row (`rows`, zero past `len`).
    q_scales: Vec<f32>,
    /// int16: K's scale per key (`groups·16`, zero past `len`).
    k_scales: Vec<f32>,
    /// int16: V's scale per channel (`d`).
    v_scales: Vec<f32>,
}

/// Every head's Q, K and V of one sequence, gathered in one pass over its tokens in order
/// ([`ReducedAttention::pack`]), for [`Packed::head`].
///
/// Reading a head straight from the QKV rows takes 128 bytes of each token's row (4.6 KB
/// apart at `hidden` 384) per head: a new page per token, which the hardware prefetchers do
/// not follow, and after the QKV product the rows are mostly out of cache — on AMD Zen 5 the
/// conversion of Q and K was 13 % of a bf16 or int8 pass (docs/performance.md). One sweep
/// reads the rows as they lie in memory, and the heads then find their inputs in cache:
///
/// - bf16: Q, K and V converted into [`head`](ReducedAttention::head)'s layouts, head after
///   head;
/// - int16: each head's rows copied, head after head (its scales are per head: the heads
///   quantise from there as [`head`](ReducedAttention::head) does).
#[derive(Default)]
pub(crate) struct Packed {
    /// The format and its proof of the CPU features, set by [`ReducedAttention::pack`].
    format: Option<Format>,
    heads: usize,
    d: usize,
    len: usize,
    /// bf16: per head, [`Scratch::q`]'s layout (`rows × d/2` words, rows rounded up to
    /// [`MR`]).
    q: Vec<u32>,
    /// bf16: per head, [`Scratch::k`]'s layout (`groups × d/2 × 16` words).
    k: Vec<u32>,
    /// bf16: per head, [`Scratch::v`]'s layout (`ceil(len / 2) × d` words).
    v: Vec<u32>,
    /// int16: per head, `len` tokens of Q, K and V (`3·d` values each).
    rows: Vec<f32>,
}

/// The words one head takes in [`Packed`]'s (and [`Scratch`]'s) bf16 Q, K and V for `len`
/// tokens of `d` values.
fn head_words(d: usize, len: usize) -> (usize, usize, usize) {
    let pairs = d / 2;
    let rows = len.next_multiple_of(MR);
    let width = len.div_ceil(2 * KEYS) * 2 * KEYS;
    (rows * pairs, width * pairs, len.div_ceil(2) * d)
}

impl Packed {
    /// `out (len × d) = softmax(Q Kᵀ) V` for head `head` of the packed sequence, as
    /// [`ReducedAttention::head`] computes it (bit-identical).
    ///
    /// # Panics
    ///
    /// If nothing was packed, `head` is not one of the packed heads or `out` does not hold
    /// `len × d` values (bugs of the caller).
    pub(crate) fn head(&self, head: usize, scratch: &mut Scratch, out: &mut [f32]) {
        let Some(format) = self.format else {
            panic!("nothing packed");
        };
        let (d, len) = (self.d, self.len);
        assert!(head < self.heads, "head {head} of {}", self.heads);
        assert_eq!(out.len(), len * d, "output shape");
        if len == 0 {
            return;
        }
        match format {
            Format::Bf16(cpu) => {
                let (qs, ks, vs) = head_words(d, len);
                let q = &self.q[head * qs..(head + 1) * qs];
                let k = &self.k[head * ks..(head + 1) * ks];
                let v = &self.v[head * vs..(head + 1) * vs];
                #[cfg(target_arch = "x86_64")]
                {
                    let _ = cpu;
                    let buffers = (&mut scratch.scores, &mut scratch.p);
                    // SAFETY: a `Cpu` exists only if the CPU has AVX-512F and AVX-512 BF16;
                    // `pack` wrote each head's Q, K and V in the layouts `compute` reads for
                    // `len` tokens of `d` values (a multiple of 16 up to 64), sliced above
                    // to their sizes.
                    unsafe { x86::compute(q, k, v, d, len, buffers, out) };
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (q, k, v, scratch);
                    match cpu {}
                }
            }
            Format::Int16(_) => {
                let at = head * len * 3 * d;
                let heads = Heads {
                    data: &self.rows[at..at + len * 3 * d],
                    stride: 3 * d,
                    q: 0,
                    k: d,
                    v: 2 * d,
                };
                ReducedAttention { format, d }.head(heads, len, scratch, out);
            }
        }
    }
}

impl ReducedAttention {
    /// The bf16 kernels for heads of `head_dim` values: `Ok(None)` if that size is not
    /// supported (the caller keeps f32 attention).
    ///
    /// # Errors
    ///
    /// A message naming the missing CPU features if this CPU cannot run the kernels.
    pub(crate) fn bf16(head_dim: usize) -> Result<Option<Self>, String> {
        let cpu = Cpu::detect()
            .ok_or_else(|| format!("this CPU lacks {}", missing_features().unwrap_or_default()))?;
        Ok(Self::sized(Format::Bf16(cpu), head_dim))
    }

    /// The int16 kernels ([`int16`]) for heads of `head_dim` values: `Ok(None)` if that size
    /// is not supported (the caller keeps f32 attention).
    ///
    /// # Errors
    ///
    /// A message naming the missing CPU features if this CPU cannot run the kernels.
    pub(crate) fn int16(head_dim: usize) -> Result<Option<Self>, String> {
        let vnni = int16::Vnni::detect()?;
        Ok(Self::sized(Format::Int16(vnni), head_dim))
    }

    /// `format` for heads of `d` values, if the kernels support that size.
    fn sized(format: Format, d: usize) -> Option<Self> {
        (d != 0 && d.is_multiple_of(16) && d <= 64).then_some(Self { format, d })
    }

    /// The products' format: `"bf16"` or `"int16"` (for logs and `doctor`).
    pub(crate) fn name(&self) -> &'static str {
        match self.format {
            Format::Bf16(_) => "bf16",
            Format::Int16(_) => "int16",
        }
    }

    /// `out (len × d) = softmax(Q Kᵀ) V` for the `len` tokens of one head (Q already scaled
    /// by `1/√d`), row-major.
    ///
    /// # Panics
    ///
    /// If a token of Q, K or V lies outside `heads.data` or `out` does not hold `len × d`
    /// values (a bug of the caller).
    pub(crate) fn head(
        &self,
        heads: Heads<'_>,
        len: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let d = self.d;
        assert_eq!(out.len(), len * d, "output shape");
        if len == 0 {
            return;
        }
        let last = (len - 1) * heads.stride + d;
        assert!(
            heads.q.max(heads.k).max(heads.v) + last <= heads.data.len(),
            "head out of bounds"
        );
        #[cfg(target_arch = "x86_64")]
        match self.format {
            // SAFETY: a `Cpu` exists only if the CPU has AVX-512F and AVX-512 BF16; the
            // assertions above keep every token of Q, K and V inside `heads.data` and `out`
            // at `len × d`; `d` is a multiple of 16 up to 64 (`sized`).
            Format::Bf16(_) => unsafe { x86::head(heads, d, len, scratch, out) },
            // SAFETY: a `Vnni` exists only if the CPU has AVX-512F/BW/VNNI; the rest as
            // above.
            Format::Int16(_) => unsafe { int16::x86::head(heads, d, len, scratch, out) },
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (heads, scratch);
            match self.format {
                Format::Bf16(cpu) => match cpu {},
                Format::Int16(vnni) => match vnni {},
            }
        }
    }

    /// Gathers every head of one sequence into `packed` in one pass over its tokens in
    /// order, for [`Packed::head`]: `rows` holds `len` tokens of `3 · heads · d` values (Q,
    /// K and V, each `heads` heads of `d`).
    ///
    /// # Panics
    ///
    /// If `rows` holds fewer than `len` such tokens (a bug of the caller).
    pub(crate) fn pack<'p>(
        &self,
        rows: &[f32],
        heads: usize,
        len: usize,
        packed: &'p mut Packed,
    ) -> &'p Packed {
        let d = self.d;
        let (hidden, width) = (heads * d, 3 * d);
        assert!(rows.len() >= len * 3 * hidden, "rows shape");
        packed.format = Some(self.format);
        (packed.heads, packed.d, packed.len) = (heads, d, len);
        match self.format {
            Format::Bf16(cpu) => {
                #[cfg(target_arch = "x86_64")]
                {
                    let _ = cpu;
                    // SAFETY: a `Cpu` exists only if the CPU has AVX-512F and AVX-512 BF16;
                    // `rows` holds `len` tokens (asserted); `d` is a multiple of 16 up to 64
                    // (`sized`).
                    unsafe { x86::pack(rows, heads, d, len, packed) };
                }
                #[cfg(not(target_arch = "x86_64"))]
                match cpu {}
            }
            Format::Int16(_) => {
                let gathered = grown(&mut packed.rows, heads * len * width);
                for (t, row) in rows.chunks_exact(3 * hidden).take(len).enumerate() {
                    for head in 0..heads {
                        let to = (head * len + t) * width;
                        for (part, value) in [0, hidden, 2 * hidden].into_iter().enumerate() {
                            let from = value + head * d;
                            gathered[to + part * d..to + (part + 1) * d]
                                .copy_from_slice(&row[from..from + d]);
                        }
                    }
                }
            }
        }
        packed
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256bh, __m256i, __m512, __m512bh, __m512i, _mm512_add_ps, _mm512_cvtepu16_epi32,
        _mm512_cvtne2ps_pbh, _mm512_cvtneps_pbh, _mm512_dpbf16_ps, _mm512_fmadd_ps,
        _mm512_fmsub_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_loadu_ps,
        _mm512_maskz_mov_ps, _mm512_max_ps, _mm512_mul_ps, _mm512_or_si512, _mm512_reduce_add_ps,
        _mm512_reduce_max_ps, _mm512_roundscale_ps, _mm512_scalef_ps, _mm512_set1_epi32,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512, _mm512_slli_epi32,
        _mm512_storeu_ps, _mm512_storeu_si512, _mm512_sub_ps,
    };

    use super::super::bf16::x86::convert_row;
    use super::{Heads, KEYS, MR, Packed, Scratch, grown, head_words};

    pub(super) const LANES: usize = 16;

    /// One head: Q, K and V to bf16, then for each block of [`MR`] query rows the scores,
    /// their softmax, and the context.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; every token `t < len` of Q, K and V
    /// (`d` values at `q/k/v + t·stride`) must lie inside `heads.data`; `out` must hold
    /// `len × d` values; `d` must be a multiple of 16 up to 64 and `len > 0`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn head(
        heads: Heads<'_>,
        d: usize,
        len: usize,
        s: &mut Scratch,
        out: &mut [f32],
    ) {
        let pairs = d / 2;
        let (qs, ks, vs) = head_words(d, len);
        s.q.clear();
        s.q.resize(qs, 0);
        s.k.clear();
        s.k.resize(ks, 0);
        s.v.clear();
        s.v.resize(vs, 0);
        let base = heads.data.as_ptr();
        // SAFETY (every `token`): token `t < len` of Q, K or V is inside `heads.data`
        // (this function's contract).
        let token = |offset: usize, t: usize| unsafe { base.add(offset + t * heads.stride) };
        let row = |offset: usize, t: usize| {
            let at = offset + t * heads.stride;
            &heads.data[at..at + d]
        };
        for t in 0..len {
            convert_row(row(heads.q, t), &mut s.q[t * pairs..(t + 1) * pairs]);
            convert_key(row(heads.k, t), t, pairs, &mut s.k);
        }
        for pair in 0..len.div_ceil(2) {
            let second = (2 * pair + 1 < len).then(|| token(heads.v, 2 * pair + 1));
            // SAFETY: `d` values at each existing token; `s.v` holds `ceil(len / 2) × d`
            // words.
            unsafe {
                interleave(
                    token(heads.v, 2 * pair),
                    second,
                    d,
                    s.v[pair * d..].as_mut_ptr(),
                );
            }
        }
        let Scratch {
            q, k, v, scores, p, ..
        } = s;
        // SAFETY: the CPU features (this function's contract); Q, K and V converted above
        // in `compute`'s layouts and sizes.
        unsafe { compute(q, k, v, d, len, (scores, p), out) };
    }

    /// Key `t` (`d = 2·pairs` values) to bf16 pairs at its place in `k` (groups of 16
    /// keys, for each channel pair the 16 keys' words side by side).
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn convert_key(key: &[f32], t: usize, pairs: usize, k: &mut [u32]) {
        let mut words = [0u32; 32];
        convert_row(key, &mut words[..pairs]);
        let (group, key) = (t / KEYS, t % KEYS);
        for (pair, &word) in words[..pairs].iter().enumerate() {
            k[(group * pairs + pair) * KEYS + key] = word;
        }
    }

    /// Every head of one sequence (`len` tokens of `3 · heads · d` values in `rows`) into
    /// `packed`'s Q, K and V, head after head as [`head`] lays out one head, reading the
    /// tokens in order.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; `rows` must hold `len` such tokens; `d`
    /// must be a multiple of 16 up to 64.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack(rows: &[f32], heads: usize, d: usize, len: usize, p: &mut Packed) {
        let (hidden, pairs) = (heads * d, d / 2);
        let stride = 3 * hidden;
        let (qs, ks, vs) = head_words(d, len);
        let q = grown(&mut p.q, heads * qs);
        let k = grown(&mut p.k, heads * ks);
        let v = grown(&mut p.v, heads * vs);
        // Old contents are overwritten below, except padding: Q's rows and K's keys past
        // `len` must be zero (V's are written as zeros by `interleave`).
        for head in 0..heads {
            q[head * qs + len * pairs..(head + 1) * qs].fill(0);
            let k = &mut k[head * ks..(head + 1) * ks];
            for key in len..ks / pairs {
                let (group, key) = (key / KEYS, key % KEYS);
                for pair in 0..pairs {
                    k[(group * pairs + pair) * KEYS + key] = 0;
                }
            }
        }
        for t in 0..len {
            let row = &rows[t * stride..(t + 1) * stride];
            for head in 0..heads {
                let at = head * d;
                convert_row(
                    &row[at..at + d],
                    &mut q[head * qs + t * pairs..head * qs + (t + 1) * pairs],
                );
                convert_key(
                    &row[hidden + at..hidden + at + d],
                    t,
                    pairs,
                    &mut k[head * ks..(head + 1) * ks],
                );
            }
            // After the second token of a pair (or a last lone one), the pair's V.
            if t % 2 == 1 || t + 1 == len {
                let pair = t / 2;
                let first = &rows[2 * pair * stride + 2 * hidden..][..hidden];
                let second = (2 * pair + 1 < len).then_some(&row[2 * hidden..]);
                for head in 0..heads {
                    let at = head * d;
                    let out = &mut v[head * vs + pair * d..head * vs + (pair + 1) * d];
                    // SAFETY: `d` values at `first[at..]` and `second[at..]` (both `hidden`
                    // long, `at + d ≤ hidden`), `d` words at `out`.
                    unsafe {
                        interleave(
                            first[at..].as_ptr(),
                            second.map(|second| second[at..].as_ptr()),
                            d,
                            out.as_mut_ptr(),
                        );
                    }
                }
            }
        }
    }

    /// For each block of [`MR`] query rows of one head: the scores, their softmax and the
    /// context, from Q, K and V in bf16 pairs (`head`'s layouts), into `out` (`len × d`);
    /// `scores` and `p` are scratch.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; `q`, `k` and `v` must hold the words
    /// [`head_words`] gives for `d` and `len`, in `head`'s layouts (zero padding included);
    /// `out` must hold `len × d` values; `d` must be a multiple of 16 up to 64.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn compute(
        q: &[u32],
        k: &[u32],
        v: &[u32],
        d: usize,
        len: usize,
        (scores_buffer, p_buffer): (&mut Vec<f32>, &mut Vec<u32>),
        out: &mut [f32],
    ) {
        let pairs = d / 2;
        let groups = len.div_ceil(2 * KEYS) * 2;
        let width = groups * KEYS;
        let token_pairs = len.div_ceil(2);
        let (qs, ks, vs) = head_words(d, len);
        assert!(
            q.len() >= qs && k.len() >= ks && v.len() >= vs,
            "packed shapes"
        );
        let scores_buffer = grown(scores_buffer, MR * width);
        let p_buffer = grown(p_buffer, MR * width / 2);
        for r0 in (0..len).step_by(MR) {
            let valid = (len - r0).min(MR);
            // SAFETY: `q` holds rows `r0..r0 + MR` of `pairs` words, `k` `groups` (even)
            // groups of keys, `scores_buffer` `MR × width` values.
            unsafe { scores(q, k, scores_buffer, r0, pairs, groups) };
            let mut inverse = [0f32; MR];
            for (r, inverse) in inverse.iter_mut().enumerate() {
                let row = &scores_buffer[r * width..(r + 1) * width];
                let p = &mut p_buffer[r * width / 2..(r + 1) * width / 2];
                // Rows past the last query get zero probabilities (and are not written).
                let sum = probabilities(row, if r < valid { len } else { 0 }, p);
                *inverse = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            }
            let out = &mut out[r0 * d..(r0 + valid) * d];
            let shape = (width / 2, token_pairs);
            let p: &[u32] = p_buffer;
            // SAFETY: `p` holds `MR` rows of `width / 2 ≥ token_pairs` words, `v`
            // `token_pairs × d` words, `out` `valid` rows of `d`.
            unsafe {
                match d / LANES {
                    1 => context::<8, 1>((p, v), 0, shape, &inverse, valid, out, d),
                    2 => context::<8, 2>((p, v), 0, shape, &inverse, valid, out, d),
                    3 => {
                        context::<4, 3>((p, v), 0, shape, &inverse, valid, out, d);
                        context::<4, 3>((p, v), 4, shape, &inverse, valid, out, d);
                    }
                    _ => {
                        context::<4, 4>((p, v), 0, shape, &inverse, valid, out, d);
                        context::<4, 4>((p, v), 4, shape, &inverse, valid, out, d);
                    }
                }
            }
        }
    }

    /// The `d` channels of tokens `first` and `second` (zero if absent) as `d` words, each
    /// `first`'s value in the low half and `second`'s in the high half.
    ///
    /// # Safety
    ///
    /// `d` f32 (a multiple of 16) must be readable at `first` and `second`, and `d` words
    /// writable at `words`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn interleave(first: *const f32, second: Option<*const f32>, d: usize, words: *mut u32) {
        let half = |x: *const f32, i: usize| -> __m512i {
            // SAFETY: 16 f32 at `x + 16i` (caller's contract); the transmute reinterprets
            // 16 bf16 as 256 bits, zero-extended to 16 lanes of 32.
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.add(i * LANES)));
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(h))
            }
        };
        for i in 0..d / LANES {
            let low = half(first, i);
            let high = second.map_or(_mm512_setzero_si512(), |x| {
                _mm512_slli_epi32::<16>(half(x, i))
            });
            // SAFETY: 16 words at `words + 16i` (caller's contract).
            unsafe {
                _mm512_storeu_si512(words.add(i * LANES).cast(), _mm512_or_si512(low, high));
            }
        }
    }

    /// 512 bits as 32 bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn bf16x32(v: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit plain-data vectors.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// The f32 scores of query rows `r0..r0 + MR` against every key group, into `scores`
    /// (`MR × groups·16`): two groups of keys at a time in 16 accumulators.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; `q` must hold rows `r0..r0 + MR` of
    /// `pairs` words, `k` `groups` (even) groups of `pairs × 16` words, `scores`
    /// `MR × groups·16` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn scores(
        q: &[u32],
        k: &[u32],
        scores: &mut [f32],
        r0: usize,
        pairs: usize,
        groups: usize,
    ) {
        let width = groups * KEYS;
        let q = q[r0 * pairs..].as_ptr();
        let k = k.as_ptr();
        let scores = scores.as_mut_ptr();
        for g in (0..groups).step_by(2) {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for pair in 0..pairs {
                // SAFETY: groups `g` and `g + 1 < groups` hold `pairs` blocks of 16 words;
                // row `r < MR` of the block holds `pairs` words (caller's contract).
                unsafe {
                    let b0 = bf16x32(_mm512_loadu_si512(k.add((g * pairs + pair) * KEYS).cast()));
                    let b1 = bf16x32(_mm512_loadu_si512(
                        k.add(((g + 1) * pairs + pair) * KEYS).cast(),
                    ));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = bf16x32(_mm512_set1_epi32(
                            q.add(r * pairs + pair).read().cast_signed(),
                        ));
                        acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (h, &acc) in acc.iter().enumerate() {
                    // SAFETY: row `r < MR` of `scores` holds `width ≥ (g + 2)·16` values.
                    unsafe { _mm512_storeu_ps(scores.add(r * width + (g + h) * KEYS), acc) };
                }
            }
        }
    }

    /// The softmax numerators `e^(s − max)` of the first `len` scores of `row` (a multiple
    /// of 32 long) as bf16 pairs into `p` (`row.len() / 2` words; zero past `len`); returns
    /// their sum (in f32, from the unrounded values), by which the context is divided.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn probabilities(row: &[f32], len: usize, p: &mut [u32]) -> f32 {
        numerators(row, len, |chunk, low, high| {
            let pairs = _mm512_cvtne2ps_pbh(high, low);
            if let Some(words) = p.get_mut(chunk * LANES..(chunk + 1) * LANES) {
                // SAFETY: `words` holds 16 words; the transmute reinterprets 32 bf16 as 512
                // bits.
                unsafe {
                    _mm512_storeu_si512(
                        words.as_mut_ptr().cast(),
                        std::mem::transmute::<__m512bh, __m512i>(pairs),
                    );
                }
            }
        })
    }

    /// The softmax numerators `e^(s − max)` of the first `len` scores of `row` (zero past
    /// `len`), 32 at a time: `store(c, low, high)` gets those of scores `32c..32c + 16` and
    /// `32c + 16..32c + 32`, for every whole 32 of `row`; returns their sum.
    ///
    /// `e^x` as `2^n · 2^f` with `n = round(x·log₂e)`, `f ∈ [−½, ½]`, `2^f` by its degree-5
    /// Taylor polynomial (relative error below 3e-6, a thousandth of bf16's rounding) and
    /// `vscalefps` for `2^n`: half the instructions of the f32 pass's `exp`. The largest
    /// score's numerator is 1 (or within an ulp of it).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn numerators(
        row: &[f32],
        len: usize,
        mut store: impl FnMut(usize, __m512, __m512),
    ) -> f32 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        let (width, len) = (row.len() - row.len() % (2 * LANES), len.min(row.len()));
        let mask = |i: usize| -> u16 {
            let lanes = len.saturating_sub(i).min(LANES);
            // At most 16 ones, so the cast is exact.
            ((1u32 << lanes) - 1) as u16
        };
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..len).step_by(LANES) {
            // SAFETY: lanes inside the mask are `row[i..len]`; the others are not read.
            m = _mm512_max_ps(m, unsafe {
                _mm512_mask_loadu_ps(m, mask(i), row.as_ptr().add(i))
            });
        }
        let shift = _mm512_set1_ps(_mm512_reduce_max_ps(m) * LOG2_E);
        let log2_e = _mm512_set1_ps(LOG2_E);
        let c = [
            std::f32::consts::LN_2,
            0.240_226_5,
            0.055_504_11,
            0.009_618_129,
            0.001_333_355_8,
        ]
        .map(|c| _mm512_set1_ps(c));
        let one = _mm512_set1_ps(1.0);
        let exp = |i: usize| -> __m512 {
            // SAFETY: `i + 16 ≤ width ≤ row.len()`.
            let s = unsafe { _mm512_loadu_ps(row.as_ptr().add(i)) };
            let t = _mm512_fmsub_ps(s, log2_e, shift);
            // Round to nearest, exceptions suppressed.
            let n = _mm512_roundscale_ps::<0x08>(t);
            let f = _mm512_sub_ps(t, n);
            let mut y = c[4];
            for &c in c[..4].iter().rev() {
                y = _mm512_fmadd_ps(y, f, c);
            }
            let y = _mm512_fmadd_ps(y, f, one);
            _mm512_maskz_mov_ps(mask(i), _mm512_scalef_ps(y, n))
        };
        let mut sum = _mm512_setzero_ps();
        for (chunk, i) in (0..width).step_by(2 * LANES).enumerate() {
            let (low, high) = (exp(i), exp(i + LANES));
            sum = _mm512_add_ps(sum, _mm512_add_ps(low, high));
            store(chunk, low, high);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// `out = (P V) · inverse` for rows `first..first + R` of the block (only those below
    /// `valid` are written): `R` rows × `DV` vectors of accumulators.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; `p` must hold `first + R` rows of
    /// `p_width ≥ token_pairs` words, `v` `token_pairs × d` words with `d = 16·DV`, `out`
    /// `valid` rows of `d`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn context<const R: usize, const DV: usize>(
        (p, v): (&[u32], &[u32]),
        first: usize,
        (p_width, token_pairs): (usize, usize),
        inverse: &[f32; MR],
        valid: usize,
        out: &mut [f32],
        d: usize,
    ) {
        let p = p[first * p_width..].as_ptr();
        let v = v.as_ptr();
        let mut acc: [[__m512; DV]; R] = [[_mm512_setzero_ps(); DV]; R];
        for pair in 0..token_pairs {
            // SAFETY: pair `pair < token_pairs` of V holds `d = 16·DV` words; row
            // `first + r` of P holds `p_width > pair` words (caller's contract).
            unsafe {
                let mut b = [bf16x32(_mm512_setzero_si512()); DV];
                for (i, b) in b.iter_mut().enumerate() {
                    *b = bf16x32(_mm512_loadu_si512(v.add(pair * d + i * LANES).cast()));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = bf16x32(_mm512_set1_epi32(
                        p.add(r * p_width + pair).read().cast_signed(),
                    ));
                    for (acc, b) in acc.iter_mut().zip(&b) {
                        *acc = _mm512_dpbf16_ps(*acc, a, *b);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = first + r;
            if row >= valid {
                break;
            }
            let scale = _mm512_set1_ps(inverse[row]);
            for (i, &acc) in acc.iter().enumerate() {
                // SAFETY: row `row < valid` of `out` holds `d ≥ 16(i + 1)` values.
                unsafe {
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(row * d + i * LANES),
                        _mm512_mul_ps(acc, scale),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::candle::tile::testing::values;

    /// `softmax(Q Kᵀ) V` in f64 for one head.
    fn naive(heads: Heads<'_>, d: usize, len: usize) -> Vec<f32> {
        let at =
            |base: usize, t: usize, c: usize| f64::from(heads.data[base + t * heads.stride + c]);
        let mut out = vec![0f32; len * d];
        for i in 0..len {
            let scores: Vec<f64> = (0..len)
                .map(|j| (0..d).map(|c| at(heads.q, i, c) * at(heads.k, j, c)).sum())
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                let v: f64 = (0..len).map(|j| e[j] * at(heads.v, j, c)).sum();
                out[i * d + c] = (v / sum) as f32;
            }
        }
        out
    }

    /// The formats this CPU runs, with the largest error each may make on
    /// [`matches_f64_attention_within_each_formats_error`]'s cases, as a share of the
    /// largest output.
    fn formats(d: usize) -> Vec<(ReducedAttention, f32)> {
        let mut formats = Vec::new();
        match ReducedAttention::bf16(d) {
            // bf16 keeps 8 significant bits (relative rounding error 2^-9 per value): an
            // emulation of exactly these roundings (numpy) gives at most 0.4 % of the largest
            // value on these cases.
            Ok(attention) => formats.push((attention.expect("supported head size"), 0.01)),
            Err(missing) => eprintln!("SKIPPED bf16: {missing}"),
        }
        match ReducedAttention::int16(d) {
            // At least ±1,891 levels per token, channel or row (600 keys): measured 0.01 % of
            // the largest output at 5 tokens, 0.16 % at 256, 0.53 % at 600 (where outputs,
            // averages of many values, are smallest beside the values' own scale; bf16
            // 0.39 %, 0.38 %, 0.55 %).
            Ok(attention) => formats.push((attention.expect("supported head size"), 0.01)),
            Err(missing) => eprintln!("SKIPPED int16: {missing}"),
        }
        formats
    }

    #[test]
    fn matches_f64_attention_within_each_formats_error() {
        // Edge cases of every loop: one token, odd lengths, lengths not a multiple of 8, 16
        // or 32, several row blocks; every supported head size; a stride wider than the
        // heads; a head longer than the model's positions (sums near i32's limit for int16).
        for (len, d) in [
            (1, 32),
            (5, 16),
            (17, 32),
            (33, 48),
            (70, 64),
            (256, 32),
            (600, 64),
        ] {
            let hidden = 3 * d + 8;
            let mut data = values(len * hidden, 7);
            // Q scaled by 1/√d as the model folds it into Q's weights, keys four times the
            // queries' range: scores spread over a few units, as in the model (some rows
            // peaked, most not). (Without the 1/√d, scores of ±30 make near-ties in a peaked
            // softmax, where bf16's rounding alone moves outputs by 3 %.)
            let q_scale = 1.0 / (d as f32).sqrt();
            for token in data.chunks_exact_mut(hidden) {
                for x in &mut token[..d] {
                    *x *= q_scale;
                }
                for x in &mut token[d + 3..2 * d + 3] {
                    *x *= 4.0;
                }
            }
            let heads = Heads {
                data: &data,
                stride: hidden,
                q: 0,
                k: d + 3,
                v: 2 * d + 5,
            };
            let want = naive(heads, d, len);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (attention, bound) in formats(d) {
                let name = attention.name();
                let mut out = vec![f32::NAN; len * d];
                attention.head(heads, len, &mut Scratch::default(), &mut out);
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(got, want)| (got - want).abs())
                    .fold(0f32, f32::max);
                // A wrong layout, mask or scale gives errors of the values' size.
                assert!(
                    worst <= bound * scale,
                    "{name}, len {len}, d {d}: worst error {worst} against a largest value of \
                     {scale}"
                );
                // A scratch used for a longer head first gives the same result.
                let mut again = vec![f32::NAN; len * d];
                let mut scratch = Scratch::default();
                let longer = 2 * len;
                let data2 = values(longer * hidden, 8);
                let mut wide = vec![0.0; longer * d];
                let heads2 = Heads {
                    data: &data2,
                    ..heads
                };
                attention.head(heads2, longer, &mut scratch, &mut wide);
                attention.head(heads, len, &mut scratch, &mut again);
                assert_eq!(out, again, "{name}, len {len}, d {d}");
            }
        }
    }

    #[test]
    fn a_packed_sequence_gives_each_head_what_head_by_head_conversion_gives() {
        for (d, attention) in [16, 32, 48, 64]
            .into_iter()
            .flat_map(|d| formats(d).into_iter().map(move |(a, _)| (d, a)))
        {
            let heads = 3;
            let hidden = heads * d;
            // One `Packed` and one `Scratch` for all lengths, the longest first: stale
            // contents of a longer sequence must not leak into a shorter one's padding.
            let mut packed = Packed::default();
            let mut scratch = Scratch::default();
            for (seed, len) in [70, 1, 2, 7, 15, 16, 17, 33, 64, 65]
                .into_iter()
                .enumerate()
            {
                let data = values(len * 3 * hidden, seed as u64 + 11);
                let sequence = attention.pack(&data, heads, len, &mut packed);
                for head in 0..heads {
                    let one = Heads {
                        data: &data,
                        stride: 3 * hidden,
                        q: head * d,
                        k: hidden + head * d,
                        v: 2 * hidden + head * d,
                    };
                    let mut want = vec![f32::NAN; len * d];
                    attention.head(one, len, &mut Scratch::default(), &mut want);
                    let mut got = vec![f32::NAN; len * d];
                    sequence.head(head, &mut scratch, &mut got);
                    let name = attention.name();
                    assert!(
                        want.iter().all(|v| v.is_finite()),
                        "{name}, d {d}, len {len}"
                    );
                    assert_eq!(got, want, "{name}, d {d}, len {len}, head {head}");
                }
            }
        }
    }

    #[test]
    fn int16_keeps_tokens_and_channels_of_zeros_exact() {
        let Ok(Some(attention)) = ReducedAttention::int16(32) else {
            eprintln!("SKIPPED: no AVX-512 VNNI");
            return;
        };
        // Token 1's Q, K and V are all zero, and V's channel 3 is zero in every token: no
        // 0/0 scale, and those outputs are exactly 0 (channel 3) or an average (token 1).
        let (len, d, hidden) = (9, 32, 96);
        let mut data = values(len * hidden, 3);
        for (t, token) in data.chunks_exact_mut(hidden).enumerate() {
            if t == 1 {
                token.fill(0.0);
            }
            token[2 * d + 3] = 0.0;
        }
        let heads = Heads {
            data: &data,
            stride: hidden,
            q: 0,
            k: d,
            v: 2 * d,
        };
        let mut out = vec![f32::NAN; len * d];
        attention.head(heads, len, &mut Scratch::default(), &mut out);
        assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
        assert!(out.chunks_exact(d).all(|row| row[3] == 0.0));
        let want = naive(heads, d, len);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (got, want) in out.iter().zip(&want) {
            assert!((got - want).abs() <= 0.002 * scale, "{got} vs {want}");
        }
    }

    #[test]
    fn unsupported_head_sizes_keep_f32() {
        for d in [0, 8, 24, 80, 128] {
            // Formats this CPU cannot run are `Err` and skipped.
            for attention in [ReducedAttention::bf16(d), ReducedAttention::int16(d)]
                .into_iter()
                .flatten()
            {
                assert!(attention.is_none(), "{d}");
            }
        }
    }
}
