//! A value the caller set that cannot be used, and which setting carried it: the library says what
//! is wrong with the quantity, the command line names its flag (and a script its keyword).

/// The settings whose values are checked only once the model or statistics are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// How many layers to linearise.
    LayerCount,
    /// Which layers to linearise, by number.
    LayerIds,
    /// The largest normalised bound selected.
    MaxBound,
    /// Inputs per scale of grouped (`MatMulNBits`) maps.
    GroupSize,
    /// Tokens per sequence of calibration or evaluation text.
    SequenceLength,
    /// The end-of-text token id appended to each document.
    EosId,
    /// The kinds of units to replace.
    Units,
}

/// `message` about the value of `setting`.
#[derive(Debug)]
pub struct Invalid {
    pub setting: Setting,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Invalid {}

/// Fails with [`Invalid`] unless `ok`.
pub fn require(ok: bool, setting: Setting, message: impl FnOnce() -> String) -> anyhow::Result<()> {
    if ok { Ok(()) } else { Err(Invalid { setting, message: message() }.into()) }
}
