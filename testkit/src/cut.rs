//! The writers' block format of the online-snapshot tests: a writer writes generation g to
//! blocks 0..N in order, each 4 KiB block stamped with (g, index), a payload that differs in
//! every word between generations, and a checksum; then g+1, and so on. A point-in-time image
//! shows every block intact (not torn) and a single cut point k: blocks < k carry g+1,
//! blocks >= k carry g.

/// Block size of the format.
pub const BLOCK: usize = 4096;
const WORDS: usize = BLOCK / 8;

/// Per-block base contents (independent of the generation) of `n` blocks, computed once:
/// the unoptimized test build is too slow to generate fresh patterns for every block of
/// every generation.
pub fn bases(n: u64) -> Vec<Vec<u64>> {
    (0..n)
        .map(|i| {
            crate::pattern(i + 1, BLOCK)
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
        .collect()
}

/// Checksum over all words but the last (which holds it).
fn checksum(words: &[u64]) -> u64 {
    words[..WORDS - 1]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
            (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(23)
        })
}

/// Block `idx` of generation `generation`: words (generation, idx), a payload that differs
/// in every word between generations (so a write torn anywhere is visible), a checksum.
pub fn stamp(base: &[u64], generation: u64, idx: u64, out: &mut [u8]) {
    let mix = generation.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut w = [0u64; WORDS];
    w[0] = generation;
    w[1] = idx;
    for k in 2..WORDS - 1 {
        w[k] = base[k] ^ mix;
    }
    w[WORDS - 1] = checksum(&w);
    for (k, word) in w.iter().enumerate() {
        out[k * 8..k * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
}

/// The generation of a block, or why it is not a valid block number `idx`.
pub fn parse(bases: &[Vec<u64>], block: &[u8], idx: u64) -> Result<u64, String> {
    let word = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap());
    let words: Vec<u64> = (0..WORDS).map(word).collect();
    if checksum(&words) != words[WORDS - 1] {
        return Err(format!("block {idx}: bad checksum (torn write?)"));
    }
    if words[1] != idx {
        return Err(format!("block {idx}: stamped as block {}", words[1]));
    }
    let generation = words[0];
    let mut want = [0u8; BLOCK];
    stamp(&bases[idx as usize], generation, idx, &mut want);
    if block != want.as_slice() {
        return Err(format!(
            "block {idx}: payload differs from generation {generation}"
        ));
    }
    Ok(generation)
}

/// Checks a point-in-time image of `bases.len()` blocks: every block valid, one cut point.
/// Returns the newest generation seen and the cut point (the number of blocks carrying it).
pub fn check_image(bases: &[Vec<u64>], img: &[u8]) -> Result<(u64, usize), String> {
    let gens = img
        .chunks(BLOCK)
        .take(bases.len())
        .enumerate()
        .map(|(i, b)| parse(bases, b, i as u64))
        .collect::<Result<Vec<u64>, String>>()?;
    let hi = gens[0];
    let k = gens.iter().position(|g| *g != hi).unwrap_or(gens.len());
    if let Some((j, g)) = gens[k..]
        .iter()
        .enumerate()
        .find(|(_, g)| hi == 0 || **g != hi - 1)
    {
        return Err(format!(
            "not a point-in-time image: blocks 0..{k} carry generation {hi}, block {} carries {g}",
            k + j
        ));
    }
    Ok((hi, k))
}
