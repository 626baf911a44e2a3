//! Matrix multiplication with bf16 inputs and f32 accumulation (AVX-512 BF16 `vdpbf16ps`),
//! for the linear layers of the reduced-precision forward pass.
//!
//! [`Bf16Weight`] holds a weight matrix converted to bf16 once, packed in the order the
//! kernel reads it; [`Bf16Weight::matmul`] converts the activations to bf16 block by block
//! (round to nearest even) and accumulates `x Wᵀ` into an f32 destination.
//!
//! The kernel computes an `MR × NR` (8 × 48) tile of the output in 24 zmm accumulators:
//! for each pair of inputs `k, k+1` it loads 48 columns × 2 weights (three vectors, 64
//! bytes each), broadcasts each row's two activations (one 32-bit word) and issues
//! `vdpbf16ps`, which adds `a[k]·w[k] + a[k+1]·w[k+1]` to each f32 lane. Rows are split
//! into blocks of [`tile::MC`] for rayon; a block's activations are converted to bf16 into its
//! own part of the scratch buffer right before use, while they are in cache.
//!
//! Where the CPU has Intel AMX (and the OS grants it), the products run on AMX tiles
//! instead ([`super::amx`], `tdpbf16ps`), 32 × 32 outputs at a time, with the weights packed
//! in panels of 16 outputs (so that a B tile's rows are contiguous), the inputs padded to a
//! multiple of 32 and the panels to an even count. (On
//! a CPU with AMX, `vdpbf16ps` is no faster than f32 FMA: measured 0.63× f32 on one.)
//!
//! Everything `unsafe` here is reached only through a [`Bf16Weight`], which can only be
//! built after run-time detection of AVX-512F and AVX-512 BF16.

use super::amx::{Amx, Kernel, TILE_BYTES, TILE_ROWS};
use super::tile::{self, LANES, Start};

/// Columns of an output tile: three vectors of 16 f32 lanes.
const NR: usize = 48;
/// Rows of an output tile.
const MR: usize = 8;
/// Rows of the AMX kernel's output block (two A tiles); a multiple of it divides [`tile::MC`].
const AMX_ROWS: usize = 2 * TILE_ROWS;

/// Proof that the CPU runs the kernel: only [`Cpu::detect`] creates one. Uninhabited where
/// the kernel does not exist, so that code using it is statically unreachable there.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Cpu(());

#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy)]
pub(super) enum Cpu {}

impl Cpu {
    /// `Some` if this CPU has AVX-512F and AVX-512 BF16.
    pub(super) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            missing_features().is_none().then_some(Self(()))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// `None` if this CPU can run the kernel, else the CPU features it lacks for it (named as
/// `is_x86_feature_detected!` names them; `/proc/cpuinfo` says `avx512_bf16`).
pub(crate) fn missing_features() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        super::tile::missing(&[
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512bf16",
                std::arch::is_x86_feature_detected!("avx512bf16"),
            ),
        ])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Some("x86_64 with avx512f, avx512bf16".to_owned())
    }
}

/// A weight matrix `W` (`outputs × inputs`) in bf16, packed for the kernel: for each panel
/// of [`NR`] outputs (16 for AMX), for each pair of inputs, the panel's outputs' two weights
/// side by side.
/// Outputs past the end of the last panel and the input past an odd count are zero.
pub(crate) struct Bf16Weight {
    /// bf16 bit patterns, `panels × pairs × width × 2` (`width` = [`NR`], or 16 for AMX).
    data: Vec<u16>,
    inputs: usize,
    outputs: usize,
    /// `ceil(inputs / 2)`, rounded up to a multiple of 16 (32 inputs) for AMX.
    pairs: usize,
    cpu: Cpu,
    /// Set if the products run on AMX tiles.
    amx: Option<Amx>,
}

impl Bf16Weight {
    /// Converts `weight` (`outputs × inputs`, row-major) to packed bf16 for the fastest
    /// kernel here ([`Kernel::best`]).
    ///
    /// # Errors
    ///
    /// A message naming the missing CPU features if this CPU cannot run the kernel.
    ///
    /// # Panics
    ///
    /// If `weight` does not hold `outputs × inputs` values (a bug of the caller).
    pub(crate) fn new(weight: &[f32], outputs: usize, inputs: usize) -> Result<Self, String> {
        Self::with_kernel(weight, outputs, inputs, Kernel::best())
    }

    /// [`Bf16Weight::new`] for `kernel` where the CPU and OS allow it, else AVX-512.
    ///
    /// # Errors
    ///
    /// As for [`Bf16Weight::new`].
    ///
    /// # Panics
    ///
    /// As for [`Bf16Weight::new`].
    pub(crate) fn with_kernel(
        weight: &[f32],
        outputs: usize,
        inputs: usize,
        kernel: Kernel,
    ) -> Result<Self, String> {
        let cpu = Cpu::detect()
            .ok_or_else(|| format!("this CPU lacks {}", missing_features().unwrap_or_default()))?;
        assert_eq!(weight.len(), outputs * inputs, "weight shape");
        let amx = match kernel {
            Kernel::Amx => Amx::detect(),
            Kernel::Avx512 | Kernel::Avx2 => None,
        };
        let packing = tile::Packing::new(outputs, inputs, 2, amx.is_some());
        let data = packing.pack(2, outputs, inputs, |o, i| to_bf16(weight[o * inputs + i]));
        let pairs = packing.words;
        Ok(Self {
            data,
            inputs,
            outputs,
            pairs,
            cpu,
            amx,
        })
    }

    /// `out += x Wᵀ` for every row of `x` (`rows × inputs`); `out` is `rows × outputs`.
    /// With `start`, `out`'s contents are ignored: `out = start + x Wᵀ` (see [`Start`]).
    /// `scratch` holds the bf16 activations (resized as needed; old contents do not matter).
    ///
    /// # Panics
    ///
    /// If `x` and `out` do not have the same number of rows (a bug of the caller).
    pub(crate) fn matmul(
        &self,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut Vec<u32>,
        start: Option<Start<'_>>,
    ) {
        let cpu = self.cpu;
        let pad_rows = if self.amx.is_some() { AMX_ROWS } else { 1 };
        tile::par_blocks(
            (x, self.inputs),
            (out, self.outputs),
            (scratch, self.pairs, pad_rows),
            start,
            |x, a, out| {
                #[cfg(target_arch = "x86_64")]
                {
                    let Cpu(()) = cpu;
                    // SAFETY: a `Cpu` exists only if the CPU has AVX-512F and AVX-512 BF16;
                    // `par_blocks` hands over the same rows of `x` and `out` and room in `a` for their
                    // pairs, rounded up to 32 rows for AMX.
                    unsafe { x86::block(x, a, out, self) };
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (a, x, out);
                    match cpu {}
                }
            },
        );
    }
}

/// `value` rounded to the nearest bf16 (ties to even), as a bit pattern; NaN stays NaN.
fn to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    // The shift leaves 16 bits, so the cast is exact.
    (bits.wrapping_add(rounding) >> 16) as u16
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::{
        __m256bh, __m256i, __m512, __m512bh, __m512i, _mm256_storeu_si256, _mm512_add_ps,
        _mm512_cvtneps_pbh, _mm512_dpbf16_ps, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_set1_epi32, _mm512_setzero_ps,
    };

    use super::super::amx::{TileSums, Tiles};
    use super::super::tile::{lane_masks, load_lanes, store_lanes};
    use super::{Amx, Bf16Weight, LANES, MR, NR, TILE_BYTES, TILE_ROWS, to_bf16};

    /// `out += x Wᵀ` for the rows of `x`, converting them to bf16 into `a` first.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; `x` must hold `rows × w.inputs` values,
    /// `out` `rows × w.outputs` and `a` at least `rows × w.pairs` (with AMX: `rows` rounded
    /// up to 32).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block(x: &[f32], a: &mut [u32], out: &mut [f32], w: &Bf16Weight) {
        let (k, n, pairs) = (w.inputs, w.outputs, w.pairs);
        let rows = out.len() / n;
        for (x, a) in x.chunks_exact(k).zip(a.chunks_exact_mut(pairs)) {
            convert_row(x, a);
        }
        if let Some(amx) = w.amx {
            // SAFETY: `a` holds `rows` rounded up to 32 rows of `pairs` words (this
            // function's contract), `out` `rows × n`.
            unsafe { amx_block(a, rows, out, w, amx) };
            return;
        }
        for panel in 0..n.div_ceil(NR) {
            let columns = (n - panel * NR).min(NR);
            let masks = lane_masks(columns);
            let b = &w.data[panel * pairs * NR * 2..(panel + 1) * pairs * NR * 2];
            for r0 in (0..rows).step_by(MR) {
                let a = &a[r0 * pairs..];
                let out = &mut out[r0 * n + panel * NR..];
                // SAFETY (all arms): the tile's rows `r0..r0 + R` exist (`R ≤ rows - r0`), so
                // `a` holds `R` rows of `pairs` words, `b` holds `pairs × NR × 2` values and
                // `out` reaches row `R - 1`, column `columns - 1` (masked beyond); the CPU
                // features are this function's own precondition.
                unsafe {
                    match rows - r0 {
                        8.. => tile::<8>(a, pairs, b, out, n, masks),
                        7 => tile::<7>(a, pairs, b, out, n, masks),
                        6 => tile::<6>(a, pairs, b, out, n, masks),
                        5 => tile::<5>(a, pairs, b, out, n, masks),
                        4 => tile::<4>(a, pairs, b, out, n, masks),
                        3 => tile::<3>(a, pairs, b, out, n, masks),
                        2 => tile::<2>(a, pairs, b, out, n, masks),
                        _ => tile::<1>(a, pairs, b, out, n, masks),
                    }
                }
            }
        }
    }

    /// `out += a·Bᵀ` on AMX tiles, 32 × 32 outputs at a time, for the `rows` rows of `out`.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F; `a` must hold `rows` rounded up to 32 rows of `w.pairs`
    /// words (a multiple of 16), `out` `rows × w.outputs` values; `w` must have been packed
    /// for AMX (inputs padded to 32, an even number of panels).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn amx_block(a: &[u32], rows: usize, out: &mut [f32], w: &Bf16Weight, amx: Amx) {
        let (n, pairs) = (w.outputs, w.pairs);
        let mut tiles = amx.tiles();
        let mut sums = [[0f32; TILE_ROWS * TILE_ROWS]; 4];
        let epilogue = |t: TileSums<'_, f32>| {
            for (r, row) in t.sums.chunks_exact(TILE_ROWS).take(t.rows).enumerate() {
                // SAFETY: `row` holds 16 f32; `out` row `t.first + r < rows` reaches every
                // column set in `t.mask`, and lanes outside it are neither read nor written.
                unsafe {
                    let p = out.as_mut_ptr().add((t.first + r) * n + t.column);
                    let old = load_lanes(p, t.mask);
                    store_lanes(p, t.mask, _mm512_add_ps(old, _mm512_loadu_ps(row.as_ptr())));
                }
            }
        };
        // SAFETY: `a` holds `rows` rounded up to 32 rows of `pairs` words (4 bytes each, a
        // whole number of 64-byte steps); the weights were packed for AMX: an even number
        // of 16-output panels of `pairs` rows of 64 bytes (this function's contract).
        unsafe {
            tiles.blocks(
                Tiles::product_bf16,
                (a.as_ptr().cast(), pairs * 4, rows),
                (w.data.as_ptr().cast(), pairs * TILE_BYTES, n),
                pairs / (TILE_BYTES / 4),
                &mut sums,
                epilogue,
            );
        }
    }

    /// One row of activations to bf16 pairs (zeros after the last input, up to the end of
    /// `a`: AMX reads inputs padded to a multiple of 32).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(in super::super) fn convert_row(x: &[f32], a: &mut [u32]) {
        let vectors = x.len() / LANES;
        for (i, chunk) in x.chunks_exact(LANES).enumerate() {
            // SAFETY: `chunk` holds 16 f32 (an unaligned load); the store writes 8 words
            // `a[8i..8i + 8]`, inside `a` since `a` has `ceil(len / 2)` words and
            // `16(i + 1) ≤ len`.
            unsafe {
                let v = _mm512_loadu_ps(chunk.as_ptr());
                let h: __m256bh = _mm512_cvtneps_pbh(v);
                let dst = a[8 * i..8 * i + 8].as_mut_ptr().cast::<__m256i>();
                _mm256_storeu_si256(dst, std::mem::transmute::<__m256bh, __m256i>(h));
            }
        }
        let tail = &x[vectors * LANES..];
        let mut words = a[vectors * 8..].iter_mut();
        for (pair, word) in tail.chunks(2).zip(&mut words) {
            let low = u32::from(to_bf16(pair[0]));
            let high = pair.get(1).map_or(0, |&v| u32::from(to_bf16(v)));
            *word = low | high << 16;
        }
        for word in words {
            *word = 0;
        }
    }

    /// `out[r][0..48] += Σ_pairs a[r]·b` for `R` rows: the micro-kernel.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512F and AVX-512 BF16; `a` must hold `R` rows of `pairs`
    /// words each, `pairs` apart, `b` `pairs × NR × 2` values, and `out` rows `ldc` apart
    /// reaching every lane set in `masks` of row `R - 1`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const R: usize>(
        a: &[u32],
        pairs: usize,
        b: &[u16],
        out: &mut [f32],
        ldc: usize,
        masks: [u16; 3],
    ) {
        let (a, b, out) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        let mut acc: [[__m512; 3]; R] = [[_mm512_setzero_ps(); 3]; R];
        for pair in 0..pairs {
            // SAFETY: `pair < pairs`, so the three 64-byte loads stay inside `b`'s
            // `pairs × 96` values and `a` row `r` word `pair` inside `a` (caller's
            // contract); the transmutes reinterpret 512 bits as 32 bf16.
            unsafe {
                let bp = b.add(pair * NR * 2);
                let b0: __m512bh =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(32).cast()));
                let b2: __m512bh =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(64).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let word = a.add(r * pairs + pair).read().cast_signed();
                    let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    acc[2] = _mm512_dpbf16_ps(acc[2], av, b2);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, (&sum, &mask)) in acc.iter().zip(&masks).enumerate() {
                // SAFETY: lanes outside `mask` are neither read nor written; those inside
                // are in `out` (caller's contract).
                // (`wrapping_add`: a vector wholly past the last column may point past `out`.)
                unsafe {
                    let p = out.wrapping_add(r * ldc + v * LANES);
                    let old = load_lanes(p, mask);
                    store_lanes(p, mask, _mm512_add_ps(old, sum));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::candle::tile::testing::{self, values};

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(to_bf16(-2.0), 0xc000);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even 1 + 2^-6.
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert!(f32::from_bits(u32::from(to_bf16(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn matches_a_naive_matmul() {
        if missing_features().is_some() {
            eprintln!(
                "SKIPPED: {} not available",
                missing_features().unwrap_or_default()
            );
            return;
        }
        // Edge cases of every loop: one element, odd inputs, partial panels and tiles,
        // several row blocks.
        // Each kernel this machine has (AMX only where the CPU and OS allow it).
        let kernels: &[Kernel] = if Kernel::best() == Kernel::Amx {
            &[Kernel::Avx512, Kernel::Amx]
        } else {
            eprintln!("SKIPPED (AMX kernel): no AMX here");
            &[Kernel::Avx512]
        };
        for (&kernel, (rows, inputs, outputs)) in kernels.iter().flat_map(|k| {
            [
                (1, 1, 1),
                (3, 7, 50),
                (9, 33, 48),
                (13, 384, 100),
                (130, 64, 16),
                (200, 1536, 97),
                (65, 384, 1536),
                (31, 130, 96),
            ]
            .map(|shape| (k, shape))
        }) {
            let x = values(rows * inputs, 1);
            let w = values(outputs * inputs, 2);
            let start = values(rows * outputs, 3);
            let packed = Bf16Weight::with_kernel(&w, outputs, inputs, kernel).expect("supported");
            assert_eq!(packed.amx.is_some(), kernel == Kernel::Amx);
            let mut out = start.clone();
            // Stale scratch contents (here NaN bf16 pairs) must not leak into the result:
            // AMX reads padding inputs and rows.
            let mut scratch = vec![0x7fc0_7fc0; 4096];
            packed.matmul(&x, &mut out, &mut scratch, None);
            for r in 0..rows {
                for c in 0..outputs {
                    let (mut exact, mut magnitude) = (f64::from(start[r * outputs + c]), 0.0);
                    for i in 0..inputs {
                        let product = f64::from(x[r * inputs + i]) * f64::from(w[c * inputs + i]);
                        exact += product;
                        magnitude += product.abs();
                    }
                    // bf16 keeps 8 significant bits: each factor is within 2^-8 relative of
                    // its f32 value, so each product within 2^-7 (+ 2^-16); f32 accumulation
                    // adds far less.
                    let error = (f64::from(out[r * outputs + c]) - exact).abs();
                    assert!(
                        error <= magnitude * (2f64.powi(-7) + 2f64.powi(-15)) + 1e-6,
                        "{kernel:?} {rows}×{inputs}×{outputs} [{r}, {c}]: error {error}, \
                         Σ|xw| {magnitude}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_start_is_written_block_by_block_as_a_separate_pass_would() {
        if missing_features().is_some() {
            eprintln!("SKIPPED: this CPU cannot run the kernel");
            return;
        }
        testing::fused_start_matches_a_separate_pass(
            |w, outputs, inputs| Bf16Weight::new(w, outputs, inputs).expect("supported"),
            |packed, x, out, scratch, start| packed.matmul(x, out, scratch, start),
        );
    }
}
