//! The reduced-precision forward passes ([`Precision::Bf16`], [`Precision::Int8`],
//! [`Precision::Int16`]) against the f32 one on real corpora: the fixture documents chunked
//! at several sizes (up to the 256-token limit) and whole (truncated), plus short sentences
//! (the precision corpus), and the parity corpus (with empty, non-Latin and over-long
//! texts). Run `scripts/fetch-model.sh` first.
//!
//! On a CPU without AVX-512 BF16 (bf16), without both AVX-512 VNNI and AVX2 (int8), or
//! without AVX2 (int16), those tests print `SKIPPED: ...` and pass. On a CPU with AVX2 but no
//! AVX-512 VNNI, int8 runs its AVX2 kernel.

use std::path::PathBuf;

use rag_ingest::embed::{BF16_SLOW_RATIO, CandleEmbedder, EmbedError, Embedder, Precision};

#[path = "support/fixtures.rs"]
mod fixtures;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

/// The embedder in `precision`, or `None` (after a loud message) if this CPU cannot run it.
fn load_reduced(precision: Precision, batch_size: usize) -> Option<CandleEmbedder> {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        dir.display()
    );
    match CandleEmbedder::load_with_precision(&dir, batch_size, precision) {
        Ok(embedder) => Some(embedder),
        Err(EmbedError::ModelLoad { reason, .. }) if reason.contains("CPU features") => {
            eprintln!("SKIPPED: {reason}");
            None
        }
        Err(e) => panic!("load {}: {e}", precision.as_str()),
    }
}

/// The bf16 embedder, or `None` if this CPU cannot run it.
fn load_bf16(batch_size: usize) -> Option<CandleEmbedder> {
    load_reduced(Precision::Bf16, batch_size)
}

#[test]
fn bf16_vectors_match_f32_on_the_fixture_corpus() {
    let Some(bf16) = load_bf16(16) else {
        return;
    };
    let f32 = CandleEmbedder::load(&model_dir(), 16).expect("load f32");
    let texts = fixtures::precision_corpus(&f32);
    assert_faithful(&f32, &bf16, &texts, 0.999);
}

/// int8 keeps every vector of both corpora within cosine 0.999 of f32's.
#[test]
fn int8_vectors_match_f32_on_the_precision_and_parity_corpora() {
    let Some(int8) = load_reduced(Precision::Int8, 16) else {
        return;
    };
    let f32 = CandleEmbedder::load(&model_dir(), 16).expect("load f32");
    assert_eq!(int8.precision().running, Precision::Int8);
    assert_eq!(int8.fingerprint(), f32.fingerprint(), "one vector space");
    let mut texts = fixtures::precision_corpus(&f32);
    texts.extend(fixtures::parity_corpus(&f32));
    assert_faithful(&f32, &int8, &texts, 0.999);
}

/// int8 quantises each token's activations on their own, so a text's vector is the same
/// whatever else shares its forward pass.
#[test]
fn int8_vectors_do_not_depend_on_the_batch() {
    if let Some(int8) = load_reduced(Precision::Int8, 8) {
        assert_batch_independent(&int8, 0.99999);
    }
}

/// int16 (12-bit weights, 16-bit activations, the AVX2 kernel) keeps every vector of both
/// corpora within cosine 0.9999 of f32's: the bar `auto` sets, which int8 does not reach.
#[test]
fn int16_vectors_match_f32_on_the_precision_and_parity_corpora() {
    let Some(int16) = load_reduced(Precision::Int16, 16) else {
        return;
    };
    let f32 = CandleEmbedder::load(&model_dir(), 16).expect("load f32");
    assert_eq!(int16.precision().running, Precision::Int16);
    assert_eq!(int16.fingerprint(), f32.fingerprint(), "one vector space");
    let mut texts = fixtures::precision_corpus(&f32);
    texts.extend(fixtures::parity_corpus(&f32));
    assert_faithful(&f32, &int16, &texts, rag_ingest::embed::AUTO_MIN_COSINE);
}

/// int16, like int8, quantises each token's activations on their own.
#[test]
fn int16_vectors_do_not_depend_on_the_batch() {
    if let Some(int16) = load_reduced(Precision::Int16, 8) {
        assert_batch_independent(&int16, 0.99999);
    }
}

/// Whether `auto` may run int16 here where bf16 does not run: AVX-512 VNNI (unless
/// `RAG_INGEST_INT16_AVX512=0`), or a CPU with AVX2 and FMA but no AVX-512.
fn int16_is_autos_fallback() -> bool {
    let avx512_off = std::env::var_os("RAG_INGEST_INT16_AVX512").is_some_and(|v| v == "0");
    (vnni_present() && !avx512_off) || avx2_without_avx512()
}

/// Whether the CPU has AVX2 and FMA but no AVX-512F (the AVX2 int16 kernel's home).
fn avx2_without_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && !std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F and AVX-512 BF16.
fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asserts that `auto` runs exactly the int16 forward pass, and says so.
fn assert_auto_is_int16(auto: &CandleEmbedder) {
    let choice = auto.precision();
    assert_eq!(choice.running, Precision::Int16, "{}", choice.reason);
    assert!(choice.reason.contains("self-check"), "{}", choice.reason);
    let int16 = load_reduced(Precision::Int16, 8).expect("int16 runs where auto chose it");
    let texts = rag_ingest::embed::SELF_CHECK_TEXTS;
    assert_eq!(
        auto.embed_blocking(&texts).expect("auto"),
        int16.embed_blocking(&texts).expect("int16"),
        "auto's int16 is the int16 forward pass"
    );
}

/// Embeds the precision corpus together, reversed (other neighbours in each pass) and every
/// 7th text alone, and asserts each vector's cosine to the batched one is at least
/// `min_cosine`.
fn assert_batch_independent(embedder: &CandleEmbedder, min_cosine: f64) {
    let texts = fixtures::precision_corpus(embedder);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let together = embedder.embed_blocking(&texts).expect("embed batch");
    let reversed: Vec<&str> = texts.iter().rev().copied().collect();
    let mut apart = embedder.embed_blocking(&reversed).expect("embed reversed");
    apart.reverse();
    for (i, text) in texts.iter().enumerate().step_by(7) {
        let alone = embedder.embed_blocking(&[text]).expect("embed alone");
        for (other, what) in [(&alone[0], "alone"), (&apart[i], "in another batch")] {
            let c = fixtures::cosine(&together[i], other);
            assert!(
                c >= min_cosine,
                "text {i} {what}: cos {c} with the batched vector"
            );
        }
    }
}

/// Embeds `texts` (over 100, with at least 8 at the token limit and some short ones) with
/// both embedders and asserts every cosine to f32 is at least `min_cosine` and every reduced
/// vector has unit norm; prints the least and mean cosine.
fn assert_faithful(
    f32: &CandleEmbedder,
    reduced: &CandleEmbedder,
    texts: &[String],
    min_cosine: f64,
) {
    let name = reduced.precision().running.as_str();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let lengths: Vec<usize> = texts
        .iter()
        .map(|t| {
            f32.tokenizer()
                .encode(*t, true)
                .expect("tokenize")
                .len()
                .min(f32.max_input_tokens())
        })
        .collect();
    assert!(texts.len() >= 100, "only {} texts", texts.len());
    assert!(
        lengths
            .iter()
            .filter(|&&n| n == f32.max_input_tokens())
            .count()
            >= 8,
        "too few texts at the {}-token limit",
        f32.max_input_tokens()
    );
    assert!(lengths.iter().any(|&n| n < 32), "no short texts");

    let reference = f32.embed_blocking(&texts).expect("embed f32");
    let vectors = reduced.embed_blocking(&texts).expect("embed reduced");
    assert_eq!(vectors.len(), texts.len());
    let cosines: Vec<f64> = reference
        .iter()
        .zip(&vectors)
        .map(|(a, b)| fixtures::cosine(a, b))
        .collect();
    let (worst, min) =
        cosines
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f64::INFINITY),
                |best, (i, c)| if c < best.1 { (i, c) } else { best },
            );
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    eprintln!(
        "{name} vs f32 over {} texts ({} tokens): min cos {min:.6} (text {worst}, {} tokens), mean cos {mean:.6}",
        texts.len(),
        lengths.iter().sum::<usize>(),
        lengths[worst]
    );
    let mut order: Vec<usize> = (0..cosines.len()).collect();
    order.sort_by(|&a, &b| cosines[a].total_cmp(&cosines[b]));
    for &i in order.iter().take(5) {
        eprintln!(
            "  cos {:.6}: text {i} ({} tokens) {:?}",
            cosines[i],
            lengths[i],
            texts[i].chars().take(60).collect::<String>()
        );
    }
    assert!(
        min >= min_cosine,
        "{name}: min cosine {min} < {min_cosine} (text {worst}: {:?})",
        texts[worst]
    );
    for (i, v) in vectors.iter().enumerate() {
        assert_eq!(v.len(), reduced.fingerprint().dims);
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "text {i}: norm {norm}");
    }
}

#[test]
fn bf16_vectors_do_not_depend_on_the_batch() {
    if let Some(bf16) = load_bf16(8) {
        assert_batch_independent(&bf16, 0.9999);
    }
}

/// `auto` runs bf16 where the CPU has AVX-512 BF16 and bf16 is the faster path (AMX tiles,
/// or a `vdpbf16ps` measured fast against f32 FMA; the self-check passes on this model), with
/// exactly the vectors of an explicit bf16 model; where bf16 does not run, int16 on AVX-512
/// VNNI or on a CPU with AVX2 and no AVX-512 (exactly an explicit int16 model's vectors);
/// elsewhere f32, saying why.
#[test]
fn auto_runs_bf16_where_the_cpu_has_it_and_says_why() {
    let dir = model_dir();
    let auto = CandleEmbedder::load_with_precision(&dir, 8, Precision::Auto).expect("load auto");
    let choice = auto.precision().clone();
    assert_eq!(choice.requested, Precision::Auto);
    let texts = [
        "retries with exponential backoff",
        "ok",
        "Die Wartung beginnt am Montag.",
    ];
    let Some(bf16) = load_bf16(8) else {
        assert_eq!(choice.bf16_dot_ratio, None);
        assert!(choice.reason.contains("lacks"), "{}", choice.reason);
        if int16_is_autos_fallback() {
            assert_auto_is_int16(&auto);
        } else {
            assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
        }
        return;
    };
    let ratio = choice
        .bf16_dot_ratio
        .expect("a CPU with AVX-512 BF16 has its vdpbf16ps measured");
    assert!(ratio.is_finite() && ratio > 0.0, "ratio {ratio}");
    let amx = cpu_has_amx() && std::env::var_os("RAG_INGEST_AMX").is_none_or(|v| v != "0");
    if amx || ratio < BF16_SLOW_RATIO {
        assert_eq!(choice.running, Precision::Bf16, "{}", choice.reason);
        assert!(choice.reason.contains("self-check"), "{}", choice.reason);
        assert_eq!(
            auto.embed_blocking(&texts).expect("auto"),
            bf16.embed_blocking(&texts).expect("bf16"),
            "auto's bf16 is the bf16 forward pass"
        );
    } else if int16_is_autos_fallback() {
        eprintln!("this CPU's vdpbf16ps takes {ratio:.2}x an f32 FMA and AMX is not available");
        assert_auto_is_int16(&auto);
    } else {
        eprintln!("this CPU's vdpbf16ps takes {ratio:.2}x an f32 FMA and AMX is not available");
        assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
    }
}

/// Runs the test `name` of this binary again in a child process with `vars` set (the
/// environment is process-wide; the other tests of this binary must not see them); `true` in
/// the child, where the test itself should run.
fn in_child(name: &str, vars: &[(&str, &str)]) -> bool {
    if std::env::var_os("RAG_INGEST_TEST_CHILD").is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let status = std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("RAG_INGEST_TEST_CHILD", "1")
        .envs(vars.iter().copied())
        .status()
        .expect("run the child test");
    assert!(status.success(), "child test {name} failed: {status}");
    false
}

/// Where `vdpbf16ps` is slow against f32 FMA (Intel's Sapphire/Emerald Rapids cores: about
/// 4x an FMA's time for twice its multiply-adds), or absent, and AMX is not available (as
/// when a hypervisor hides it: the CPU then does not even report AMX), and int16 has no
/// AVX-512 kernel (no VNNI, or `RAG_INGEST_INT16_AVX512=0`), `auto` keeps f32, the faster
/// path there; an explicit bf16 still runs where the CPU has it, and an explicit int16 runs
/// on AVX2. `RAG_INGEST_BF16_SPEED=slow` replaces bf16's measurement so that this runs on
/// any CPU with AVX-512 (without it, int16 on AVX2 is the faster path).
#[test]
fn auto_keeps_f32_on_avx512_where_neither_bf16_nor_int16_pays() {
    const NAME: &str = "auto_keeps_f32_on_avx512_where_neither_bf16_nor_int16_pays";
    let vars = [
        ("RAG_INGEST_BF16_SPEED", "slow"),
        ("RAG_INGEST_INT16_AVX512", "0"),
        ("RAG_INGEST_AMX", "0"),
    ];
    if !in_child(NAME, &vars) {
        return;
    }
    if !has_avx512() {
        eprintln!("SKIPPED: no AVX-512F (int16 on AVX2 is auto's choice there)");
        return;
    }
    let dir = model_dir();
    let auto = CandleEmbedder::load_with_precision(&dir, 8, Precision::Auto).expect("load auto");
    let choice = auto.precision().clone();
    assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
    let bf16 = cpu_has_bf16().then(|| load_bf16(8)).flatten();
    assert_eq!(choice.bf16_dot_ratio, cpu_has_bf16().then_some(4.0));
    if let Some(int16) = load_reduced(Precision::Int16, 8) {
        let reason = &int16.precision().reason;
        assert!(reason.contains("on avx2"), "{reason}");
    }
    let f32 = CandleEmbedder::load(&dir, 8).expect("f32");
    let texts = rag_ingest::embed::SELF_CHECK_TEXTS;
    assert_eq!(
        auto.embed_blocking(&texts).expect("auto"),
        f32.embed_blocking(&texts).expect("f32"),
        "auto's f32 is the f32 forward pass"
    );
    if let Some(bf16) = bf16 {
        assert_eq!(bf16.precision().running, Precision::Bf16);
    }
}

/// Where bf16 does not run (slow `vdpbf16ps` and no AMX, or no AVX-512 BF16: Intel Cascade
/// Lake, Ice Lake, Sapphire/Emerald Rapids with AMX hidden) and the CPU has AVX-512 VNNI,
/// `auto` runs int16 on the AVX-512 kernel (`vpdpwssd`): exactly an explicit int16 model's
/// vectors (`RAG_INGEST_BF16_SPEED=slow` replaces bf16's measurement, so that this runs on
/// any CPU with AVX-512 VNNI).
#[test]
fn auto_runs_int16_on_avx512_vnni_where_bf16_does_not_run() {
    const NAME: &str = "auto_runs_int16_on_avx512_vnni_where_bf16_does_not_run";
    let vars = [("RAG_INGEST_BF16_SPEED", "slow"), ("RAG_INGEST_AMX", "0")];
    if !in_child(NAME, &vars) {
        return;
    }
    if !has_avx512() || !vnni_present() {
        eprintln!("SKIPPED: no AVX-512 VNNI here");
        return;
    }
    let auto =
        CandleEmbedder::load_with_precision(&model_dir(), 8, Precision::Auto).expect("load auto");
    let choice = auto.precision().clone();
    assert!(choice.reason.contains("on avx512"), "{}", choice.reason);
    assert_auto_is_int16(&auto);
}

/// Where `vdpbf16ps` is slow (Intel's AMX-class cores) or absent and the CPU has AVX-512
/// VNNI, int8 computes attention's two products in int16 (`vpdpwssd`, exact i32 sums) and
/// keeps int8's fidelity; int16 keeps f32 attention (int16 attention bought it no speed
/// there and cost fidelity); f32 is the reference. `RAG_INGEST_BF16_SPEED=slow` replaces
/// bf16's measurement, so that this runs on any CPU with AVX-512 VNNI (on AMD Zen 4 int8
/// otherwise computes attention in bf16).
#[test]
fn int8_computes_attention_in_int16_where_bf16_is_slow() {
    const NAME: &str = "int8_computes_attention_in_int16_where_bf16_is_slow";
    let vars = [("RAG_INGEST_BF16_SPEED", "slow"), ("RAG_INGEST_AMX", "0")];
    if !in_child(NAME, &vars) {
        return;
    }
    if !vnni_present() {
        eprintln!("SKIPPED: no AVX-512 VNNI here");
        return;
    }
    let int8 = load_reduced(Precision::Int8, 16).expect("int8 runs on AVX-512 VNNI");
    assert_eq!(
        int8.precision().attention,
        "int16",
        "{}",
        int8.precision().reason
    );
    let f32 = CandleEmbedder::load(&model_dir(), 16).expect("load f32");
    assert_eq!(f32.precision().attention, "f32");
    let texts = fixtures::precision_corpus(&f32);
    assert_faithful(&f32, &int8, &texts, 0.999);
    let int16 = load_reduced(Precision::Int16, 8).expect("int16 runs on AVX-512 VNNI");
    assert_eq!(int16.precision().attention, "f32");
}

/// Whether the CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
fn vnni_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where `vdpbf16ps` is fast (AMD Zen 4: one 512-bit instruction per cycle, as FMA) and the
/// self-check passes, `auto` runs bf16 on AVX-512 (`RAG_INGEST_BF16_SPEED=fast` replaces the
/// measurement, `RAG_INGEST_AMX=0` keeps AMX out, so this runs on any CPU with AVX-512 BF16
/// but no AMX).
#[test]
fn auto_runs_bf16_where_vdpbf16ps_is_fast() {
    const NAME: &str = "auto_runs_bf16_where_vdpbf16ps_is_fast";
    let vars = [("RAG_INGEST_BF16_SPEED", "fast"), ("RAG_INGEST_AMX", "0")];
    if !in_child(NAME, &vars) {
        return;
    }
    if cpu_has_amx() {
        eprintln!("SKIPPED: this CPU has AMX (auto keeps f32 when AMX is turned off)");
        return;
    }
    let Some(bf16) = load_bf16(8) else {
        return;
    };
    let auto =
        CandleEmbedder::load_with_precision(&model_dir(), 8, Precision::Auto).expect("load auto");
    let choice = auto.precision().clone();
    assert_eq!(choice.running, Precision::Bf16, "{}", choice.reason);
    assert_eq!(choice.bf16_dot_ratio, Some(1.0));
    let texts = rag_ingest::embed::SELF_CHECK_TEXTS;
    assert_eq!(
        auto.embed_blocking(&texts).expect("auto"),
        bf16.embed_blocking(&texts).expect("bf16"),
        "auto's bf16 is the bf16 forward pass"
    );
}

/// On a CPU with AMX that the process may not use (here: `RAG_INGEST_AMX=0`, as when the OS
/// refuses the tile state), `auto` does not run bf16: there AVX-512 BF16 alone is slower
/// than f32. It runs int16 where `vpdpwssd` is fast, else f32.
/// Runs itself again in a child process with the variable set (the environment is
/// process-wide; the other tests of this binary must see AMX).
#[test]
fn auto_keeps_f32_on_an_amx_cpu_that_cannot_use_amx() {
    const NAME: &str = "auto_keeps_f32_on_an_amx_cpu_that_cannot_use_amx";
    if !in_child(NAME, &[("RAG_INGEST_AMX", "0")]) {
        return;
    }
    if !cpu_has_amx() {
        eprintln!("SKIPPED: this CPU has no AMX");
        return;
    }
    let dir = model_dir();
    let auto = CandleEmbedder::load_with_precision(&dir, 8, Precision::Auto).expect("load auto");
    let choice = auto.precision().clone();
    if int16_is_autos_fallback() {
        assert_auto_is_int16(&auto);
    } else {
        assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
    }
    // An explicit bf16 still runs (on the AVX-512 kernel).
    let bf16 = load_bf16(8).expect("bf16 loads on a CPU with AMX");
    assert_eq!(bf16.precision().running, Precision::Bf16);
}

/// Whether the CPU has the AMX tile unit (CPUID leaf 7, EDX bit 24).
fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A self-check that bf16 (or int16) cannot pass keeps f32: the vectors are exactly the
/// reference ones.
#[test]
fn auto_keeps_f32_when_the_self_check_fails() {
    let dir = model_dir();
    // No cosine exceeds 1: a threshold above it fails on any CPU.
    let strict = CandleEmbedder::load_auto(&dir, 8, 1.5).expect("load");
    let choice = strict.precision().clone();
    assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
    let f32 = CandleEmbedder::load(&dir, 8).expect("f32");
    let texts = rag_ingest::embed::SELF_CHECK_TEXTS;
    assert_eq!(
        strict.embed_blocking(&texts).expect("auto"),
        f32.embed_blocking(&texts).expect("f32")
    );
    // And the real threshold holds on the self-check texts wherever bf16 or int16 runs.
    let candidates = [load_bf16(8), load_reduced(Precision::Int16, 8)];
    for reduced in candidates.iter().flatten() {
        let a = f32.embed_blocking(&texts).expect("f32");
        let b = reduced.embed_blocking(&texts).expect("reduced");
        let least = a
            .iter()
            .zip(&b)
            .map(|(x, y)| fixtures::cosine(x, y))
            .fold(f64::INFINITY, f64::min);
        assert!(
            least >= rag_ingest::embed::AUTO_MIN_COSINE,
            "{}: least cosine {least}",
            reduced.precision().running.as_str()
        );
    }
}
