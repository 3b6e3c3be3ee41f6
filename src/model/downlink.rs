//! What central sends down to the store, as the uplink received it; the core applies it.

/// A message central sent down, by the topic it came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downlink {
    /// `…/{store}/profiles`: profile upserts.
    Profiles(bytes::Bytes),
    /// `…/erasures`: customer erasure requests.
    Erasures(bytes::Bytes),
    /// `…/campaigns` (`tenant_wide`) or `…/{store}/campaigns`: a campaign set, retained.
    Campaigns {
        tenant_wide: bool,
        body: bytes::Bytes,
    },
}
